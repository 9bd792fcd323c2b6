"""Stop requests: SIGUSR1/SIGTERM and the wall-clock limit become "save, then exit 75".

A handler only sets a flag; the loop checks it at the end of each step, and all ranks agree
through one all-reduce, so a signal to any single rank (or to all of them, as torchrun and
SLURM send it) stops every rank after the same step.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from types import FrameType

import torch
import torch.distributed as dist

from scaletrain.errors import ScaletrainError

EXIT_RESUMABLE = 75  # EX_TEMPFAIL: checkpoint saved, run the same command again to continue
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequested(ScaletrainError):
    """The run saved a checkpoint and stopped early on purpose."""

    exit_code = EXIT_RESUMABLE


class StopWatch:
    """Collects stop requests on this rank: a signal, or the time limit coming close."""

    def __init__(self, time_limit_seconds: float | None) -> None:
        self.signal: int | None = None
        self.start = time.monotonic()
        self.limit = time_limit_seconds
        self.slowest_step = 0.0
        self.slowest_save = 0.0
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum

    def record_step(self, seconds: float) -> None:
        self.slowest_step = max(self.slowest_step, seconds)

    def record_save(self, seconds: float) -> None:
        self.slowest_save = max(self.slowest_save, seconds)

    def _near_limit(self) -> bool:
        """Would one more step plus a save overrun the limit? (with a 2x margin)"""
        if self.limit is None:
            return False
        needed = 2 * (self.slowest_step + self.slowest_save)
        return time.monotonic() - self.start + needed >= self.limit

    def agreed_reason(self, device: torch.device) -> str | None:
        """Collective: why every rank should stop now (or None). Call once per step."""
        flags = torch.tensor(
            [self.signal or 0, int(self._near_limit())], dtype=torch.int64, device=device
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0]:
            return f"signal {signal.Signals(int(flags[0])).name}"
        if flags[1]:
            return "time limit"
        return None

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


PR_SET_PDEATHSIG = 1


def on_parent_death(signum: int) -> None:
    """Have the kernel send `signum` to this process when its parent dies (Linux only)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)


def die_with_launcher() -> None:
    """Under torchrun, have the kernel kill this rank if the launcher dies (Linux only).

    Otherwise a `kill -9` of torchrun leaves orphaned ranks training on, racing the restarted
    job for the same checkpoint folder.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    on_parent_death(signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before we asked
        os._exit(1)
