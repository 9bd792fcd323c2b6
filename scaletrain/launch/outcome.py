"""How a rank tells its launcher why it ended: the exit code (2, 75, 124, ...) and one line.

`torchrun` exits 1 whenever a worker exits non-zero and prints a ChildFailedError traceback,
so a refusal (2), a stop on purpose (75) or a hang (124) all look like a crash. A rank that
ends for a known reason therefore writes its code and message into the file torchelastic
names in `TORCHELASTIC_ERROR_FILE` (torchelastic's own channel for "why did this worker
fail"; its JSON keeps the `message` torch reads). The per-node launcher
(`scaletrain.launch.agent`) reads those files after the ranks are gone, also when it was
stopped by a signal and torch kept no exit codes.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from scaletrain.errors import ScaletrainError

ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"  # set by torchelastic for each worker
KEY = "scaletrain"  # our fields inside torchelastic's error JSON


@dataclass(frozen=True)
class Outcome:
    """Why one rank (or the whole node) ended."""

    code: int
    message: str
    rank: int = -1
    time: float = 0.0


def record_exit(code: int, message: str) -> None:
    """Leave this rank's exit code and one-line message for its launcher (no-op outside one).

    Written atomically: a launcher may read at any moment. A failure to write (the folder
    gone, a full disk) must not hide the exit itself, so it is ignored.
    """
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    now = time.time()
    line = message.splitlines()[0] if message else ""
    rank = int(os.environ.get("RANK", "-1"))
    data = {"message": line, "timestamp": int(now), KEY: {"code": code, "rank": rank, "time": now}}
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    with suppress(OSError):  # the exit status still says it
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data))
        os.replace(tmp, target)


@contextmanager
def recorded_exit() -> Iterator[None]:
    """Around a rank's work: a ScaletrainError (2, 75, ...) is recorded, then goes on."""
    try:
        yield
    except ScaletrainError as err:
        record_exit(err.exit_code, str(err))
        raise


def read_outcomes(log_dir: Path) -> list[Outcome]:
    """Every outcome the ranks of one agent recorded under its log folder, in its last attempt
    (`<log_dir>/<run>/attempt_<N>/<local rank>/error.json`; `--max-restarts` makes more)."""
    files = sorted(log_dir.rglob("error.json"))
    attempts = {path.parent.parent for path in files}
    last = max(attempts, key=lambda folder: _attempt(folder.name), default=None)
    found = []
    for path in (p for p in files if p.parent.parent == last):
        try:
            data = json.loads(path.read_text())
            ours = data[KEY]
            code, rank, at = int(ours["code"]), int(ours["rank"]), float(ours["time"])
            found.append(Outcome(code, str(data["message"]), rank, at))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours (a rank that used torch's @record), or half-written
    return found


def _attempt(name: str) -> int:
    number = name.removeprefix("attempt_")
    return int(number) if number.isdigit() else -1


def first_outcome(outcomes: list[Outcome]) -> Outcome | None:
    """The cause: the earliest recorded outcome (the others usually follow from it)."""
    return min(outcomes, key=lambda o: (o.time, o.rank), default=None)


def exit_status(returncode: int) -> int:
    """A child's return code as a shell reports it: killed by signal N -> 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def signal_name(code: int) -> str:
    """`SIGKILL` for 137 (128 + 9), '' for a code that is no signal."""
    try:
        return signal.Signals(code - 128).name if code > 128 else ""
    except ValueError:
        return ""
