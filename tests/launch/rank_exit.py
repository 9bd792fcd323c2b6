"""A rank for the launcher tests that ends as told, in a second and without training.

    python -m scaletrain.launch.agent --standalone --nproc-per-node 2 rank_exit.py MODE DIR

record: rank 1 records exit 2 with a message and exits 2 (the others wait to be stopped).
kill:   rank 1 is killed by SIGKILL without a word.
stop:   every rank waits for SIGTERM (written DIR/ready.<rank> first), then records 75, exits 75.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from scaletrain.launch.outcome import record_exit

REFUSAL = "config error: data.paths: rank 1 cannot read it"
STOPPED = "stopped after step 3 (signal SIGTERM); checkpoint saved; run the same command to resume"


def main() -> int:
    mode, folder = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    if mode == "stop":
        stop = []
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
        (folder / f"ready.{rank}").touch()
        while not stop:
            time.sleep(0.05)
        record_exit(75, STOPPED)
        return 75
    if rank == 1 and mode == "record":
        record_exit(2, REFUSAL)
        return 2
    if rank == 1 and mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(120)  # until the agent stops this rank
    return 0


if __name__ == "__main__":
    sys.exit(main())
