"""Hang watchdog: turn "the job stopped printing" into an error that names the ranks to blame.

The training thread only moves a cheap local progress marker (step, micro-batch, phase). A
daemon thread on every rank publishes that marker to torch.distributed's key-value store a few
times per `fault.heartbeat_seconds`, and when its own rank has not progressed for that long it
reads every rank's marker and logs which ranks are behind (stuck before a collective the others
wait in) or silent (dead or frozen). After `fault.collective_timeout_minutes` without progress
the rank exits with EXIT_HUNG: the process-group timeout alone is not enough, because DeepSpeed's
shared-memory all-reduce on CPU ranks waits forever.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass

import torch.distributed as dist

from scaletrain.launch.outcome import record_exit
from scaletrain.logs import get_logger
from scaletrain.train.callbacks import HEARTBEAT, Callback

log = get_logger(__name__)

KEY = "scaletrain/heartbeat/{rank}"
PHASES = ("start", "forward", "backward", "step", "eval", "save", "pipeline")
EXIT_HUNG = 124  # like coreutils' `timeout`


@dataclass(frozen=True, order=True)
class Marker:
    """How far a rank got; markers compare in training order."""

    step: int
    micro: int
    phase: int


class Heartbeat:
    """One per rank; `mark()` is called by the training loop, the rest runs in a thread."""

    def __init__(self, rank: int, world_size: int, seconds: float, timeout_seconds: float) -> None:
        self.rank, self.world_size, self.seconds = rank, world_size, seconds
        self.timeout = timeout_seconds
        self.marker = Marker(0, 0, 0)
        self.changed_at = time.monotonic()
        self._reported: Marker | None = None
        self._stop = threading.Event()
        self._store = dist.distributed_c10d._get_default_store()
        self._thread = threading.Thread(target=self._watch, name="heartbeat", daemon=True)
        self._publish()
        self._thread.start()

    def mark(self, step: int, micro: int, phase: str) -> None:
        self.marker = Marker(step, micro, PHASES.index(phase))
        self.changed_at = time.monotonic()

    def close(self) -> None:
        self._stop.set()

    def _publish(self) -> None:
        m = self.marker
        value = json.dumps([m.step, m.micro, m.phase, time.time()])
        self._store.set(KEY.format(rank=self.rank), value)

    def _watch(self) -> None:
        interval = max(0.5, min(self.seconds or self.timeout, self.timeout) / 4)
        while not self._stop.wait(interval):
            try:
                self._publish()
                stalled = time.monotonic() - self.changed_at
                naming = self.seconds > 0 and stalled >= self.seconds
                if naming and self._reported != self.marker:
                    self._reported = self.marker
                    self._report(stalled, interval)
                if stalled >= self.timeout:
                    message = (
                        f"rank {self.rank}: no progress for {stalled:.0f}s "
                        f"(fault.collective_timeout_minutes); exiting with {EXIT_HUNG}"
                    )
                    log.error("%s", message)
                    record_exit(EXIT_HUNG, message)  # os._exit skips the CLI's own recording
                    os._exit(EXIT_HUNG)
            except Exception:  # the store is gone: the run is ending anyway
                return

    def _report(self, stalled: float, interval: float) -> None:
        keys = [KEY.format(rank=r) for r in range(self.world_size)]
        now = time.time()
        behind: dict[int, str] = {}
        silent: dict[int, str] = {}
        for rank, raw in enumerate(self._store.multi_get(keys)):
            step, micro, phase, stamp = json.loads(raw)
            if Marker(step, micro, phase) < self.marker:
                behind[rank] = f"{rank} (step {step}, micro-batch {micro}, {PHASES[phase]})"
            elif now - stamp > 4 * interval:
                silent[rank] = f"{rank} (silent for {now - stamp:.0f}s)"
        named = behind | silent
        if not named:
            return  # everyone is as far as we are: a slow step, not a hang
        if self.rank != min(r for r in range(self.world_size) if r not in named):
            return  # one rank speaks for all the waiting ones
        m = self.marker
        log.error(
            "no progress for %.0fs at step %d (%s): waiting for rank(s) %s",
            stalled,
            m.step,
            PHASES[m.phase],
            ", ".join(named.values()),
        )


class HeartbeatCallback(Callback):
    """Moves the heartbeat's marker at each phase of the loop the trainer announces."""

    priority = HEARTBEAT

    def __init__(self, heartbeat: Heartbeat) -> None:
        self.heartbeat = heartbeat

    def on_step_start(self, step: int) -> None:
        self.heartbeat.mark(step, 0, "start")

    def on_micro_batch(self, step: int, micro: int, phase: str) -> None:
        self.heartbeat.mark(step, micro, phase)

    def on_eval(self, step: int) -> None:
        self.heartbeat.mark(step, 0, "eval")

    def on_save(self, step: int) -> None:
        self.heartbeat.mark(step, 0, "save")

    def on_close(self) -> None:
        self.heartbeat.close()
