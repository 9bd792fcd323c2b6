"""torchrun that exits with the ranks' code: the per-node launcher of `launch local` and SLURM.

    python -m scaletrain.launch.agent --standalone --nproc-per-node 2 -m scaletrain train --config C

It takes torchrun's arguments unchanged and runs torch's own elastic agent in this process
(`torch.distributed.run.run`), so that the end of the ranks is ours to report: the `torchrun`
command exits 1 with a 50-line ChildFailedError traceback whatever the ranks said. Here the
exit status is the failing rank's (2 refused, 75 stopped resumably, 124 hung, ...) and the last
line on stderr is its one-line message, read from the outcome each rank recorded
(`scaletrain.launch.outcome`). A rank that died without a word (a crash, a kill) gives its own
code and a line naming it; its traceback, if any, is in the output above. A stop signal to
the agent (SIGTERM, SIGUSR1, Ctrl-C) reaches every rank, as with torchrun.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from scaletrain.launch.outcome import (
    Outcome,
    exit_status,
    first_outcome,
    read_outcomes,
    signal_name,
)

EXIT_FILE_ENV = "SCALETRAIN_EXIT_FILE"  # where the sbatch script reads "CODE MESSAGE"
HANDLED = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"  # torchelastic's default plus SIGUSR1


def run_ranks(argv: list[str]) -> Outcome | None:
    """Run torchrun's agent to the end; None when every rank finished, else why not."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    os.environ.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", HANDLED)
    if args.log_dir:  # the user's folder keeps torch's logs; ours is a fresh one inside it
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="scaletrain-ranks-", dir=args.log_dir) as logs:
        args.log_dir = logs  # each rank's TORCHELASTIC_ERROR_FILE lies below it
        try:
            run(args)
            return None
        except ChildFailedError as err:
            rank, failure = err.get_first_failure()
            code = exit_status(failure.exitcode)
            fallback = Outcome(code, _unexplained(rank, code), rank, failure.timestamp)
        except SignalException as err:
            code = 128 + int(err.sigval)
            line = f"stopped by {signal.Signals(err.sigval).name} before any rank said why"
            fallback = Outcome(code, line, -1, time.time())
        return first_outcome(read_outcomes(Path(logs))) or fallback


def _unexplained(rank: int, code: int) -> str:
    how = f"was killed by {signal_name(code)}" if signal_name(code) else f"exited {code}"
    return f"rank {rank} {how} without a message (a crash: its output above says why)"


def main(argv: list[str] | None = None) -> int:
    outcome = run_ranks(sys.argv[1:] if argv is None else argv)
    if outcome is None:
        return 0
    exit_file = os.environ.get(EXIT_FILE_ENV)
    if exit_file and os.environ.get("SLURM_NODEID", "0") == "0":  # the batch script's node
        with contextlib.suppress(OSError):  # the exit status still says it
            Path(exit_file).write_text(f"{outcome.code} {outcome.message}\n")
    print(outcome.message, file=sys.stderr, flush=True)
    return outcome.code


if __name__ == "__main__":
    sys.exit(main())
