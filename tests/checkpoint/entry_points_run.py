"""Run several `scaletrain train` commands one after the other in this one process (a test helper).

    python tests/checkpoint/entry_points_run.py RESULTS.json MARKER ARGV.json

ARGV.json holds a list of argument lists for `scaletrain`; RESULTS.json gets, per command, its
exit code, what it printed on stderr, and whether MARKER existed afterwards. One process pays
the DeepSpeed and megatron-core imports once for all the commands (each a world of one).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
from pathlib import Path

from scaletrain.cli import main
from scaletrain.logs import setup_logging

WORLD_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run(argv: list[str]) -> dict:
    for name in WORLD_ENV:  # a fresh world of one (and port) per command
        os.environ.pop(name, None)
    err = io.StringIO()
    for handler in logging.getLogger("scaletrain").handlers:  # the log lines go with it
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(err)
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return {"code": code, "stderr": err.getvalue().splitlines()}


def entry() -> None:
    results_file, marker, argv_file = sys.argv[1:]
    setup_logging()
    results = []
    for argv in json.loads(Path(argv_file).read_text()):
        result = run(argv)
        result["marker"] = Path(marker).exists()
        results.append(result)
    Path(results_file).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    entry()
