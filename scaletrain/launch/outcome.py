"""How a launcher tells "stopped on purpose, resume me" (75) from a crash.

torchrun exits 1 whenever a worker exits non-zero, so the workers' 75 is lost on the way out.
`scaletrain train` therefore leaves a marker file in the run folder when it stops resumably;
a launcher clears it before starting torchrun and reads it after torchrun ends.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from scaletrain.fault.signals import EXIT_RESUMABLE, StopRequested

MARKER = "stopped-resumable"  # also named in slurm/job.sbatch.in


def mark_resumable(run_dir: str | Path, message: str) -> None:
    """Global rank 0 records the stop (atomically: a launcher may read at any moment)."""
    if os.environ.get("RANK", "0") != "0":
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{MARKER}.{os.getpid()}"
    tmp.write_text(message + "\n")
    os.replace(tmp, run_dir / MARKER)


@contextmanager
def resumable_marker(run_dir: str | Path) -> Iterator[None]:
    """Around training: a StopRequested leaves the marker, then goes on (exit 75)."""
    try:
        yield
    except StopRequested as stop:
        mark_resumable(run_dir, str(stop))
        raise


def clear_marker(run_dir: str | Path) -> None:
    (Path(run_dir) / MARKER).unlink(missing_ok=True)


def launcher_exit_code(returncode: int, run_dir: str | Path) -> int:
    """0 when training finished, 75 when it stopped resumably, the workers' failure otherwise."""
    if returncode == 0:
        return 0
    if (Path(run_dir) / MARKER).is_file():
        return EXIT_RESUMABLE
    if returncode < 0:  # torchrun itself was killed by a signal: the shell's convention
        return 128 - returncode
    return returncode
