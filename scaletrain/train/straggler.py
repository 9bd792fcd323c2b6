"""The straggler report: which rank is slow, and in which phase of the step.

A rank that is slow in backward is hidden by the gradient all-reduce: its peers wait for it
inside the collective, so every rank's step (and every rank's backward) takes as long as the
slowest one's. Only the time *outside* collectives tells them apart. Every
`logging.straggler_interval` steps one step runs under `torch.profiler`, which records each
collective's work as its own event (`gloo:all_reduce`, `gloo:send`, ... on the CPU, the NCCL
kernels on a GPU) with its real duration, waiting included. The step's phases are marked with
`record_function`; a phase's compute time is its duration minus the collective time inside it.
Each rank's times are gathered to rank 0, which compares every rank with the median of its peers
(the ranks of the same pipeline stage, which run the same layers).

Why the profiler and not a barrier after each phase: the wait happens *inside* the phase (TP
all-reduces in forward/backward, DeepSpeed's gradient reduction in `engine.backward`), so a
barrier after it finds everyone already in step. Wrapping the collectives by hand would miss
megatron-core's import-time aliases of them. The profiler sees every one, and runs only on the
measured steps: with the interval at 0 nothing is timed and nothing is wrapped.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from scaletrain.logs import get_logger

log = get_logger(__name__)

PHASES = ("data", "forward", "backward", "step")
MARK = "scaletrain.phase."
# Test-only: "RANK:SECONDS:FROM_STEP" makes that rank sleep SECONDS at the start of every
# backward pass of every step >= FROM_STEP (the straggler tests' slow rank).
SLOW_BACKWARD_ENV = "SCALETRAIN_TEST_SLOW_BACKWARD"


@dataclass
class RankTimes:
    """One rank's phase times of a measured step, in seconds."""

    rank: int
    host: str
    coords: dict[str, int]
    compute: dict[str, float]
    """Per phase: its duration minus the time inside collectives."""
    wait: float
    """Time inside collectives during the step (waiting for peers and moving data)."""

    @property
    def total(self) -> float:
        return sum(self.compute.values())

    def where(self) -> str:
        return f"{self.host}, tp{self.coords['tp']} pp{self.coords['pp']} dp{self.coords['dp']}"


@dataclass
class Straggler:
    times: RankTimes
    ratio: float
    """Its compute time over the median of its peers'."""
    phase: str
    """The phase with the largest excess over the peers' median."""
    excess: float


def find_stragglers(ranks: list[RankTimes], threshold: float) -> list[Straggler]:
    """Every rank whose compute time exceeds its peers' median by more than `threshold`x,
    slowest first. Peers: the other ranks of the same pipeline stage."""
    found = []
    for me in ranks:
        peers = [r for r in ranks if r.coords["pp"] == me.coords["pp"] and r.rank != me.rank]
        if not peers:
            continue
        median = statistics.median(r.total for r in peers)
        ratio = me.total / median if median > 0 else float("inf")
        if ratio <= threshold:
            continue
        excess = {p: me.compute[p] - statistics.median(r.compute[p] for r in peers) for p in PHASES}
        phase = max(PHASES, key=excess.__getitem__)
        found.append(Straggler(me, ratio, phase, excess[phase]))
    return sorted(found, key=lambda s: -s.ratio)


def delay_from_env(rank: int) -> tuple[float, int]:
    """(seconds, from step) the test hook delays this rank's backward; (0, 0) without it."""
    spec = os.environ.get(SLOW_BACKWARD_ENV)
    if not spec:
        return 0.0, 0
    slow_rank, seconds, from_step = spec.split(":")
    return (float(seconds), int(from_step)) if rank == int(slow_rank) else (0.0, 0)


class StepTimer:
    """Phase marks of one step; profiles only when the step is measured."""

    def __init__(self, step: int, measured: bool, device: torch.device) -> None:
        self.step, self.measured, self.device = step, measured, device
        self.profiler: profile | None = None

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        if not self.measured:
            yield
            return
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as self.profiler:
            yield

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        if not self.measured:
            return contextlib.nullcontext()
        return self._mark(name)

    @contextlib.contextmanager
    def _mark(self, name: str) -> Iterator[None]:
        self._sync()
        with record_function(MARK + name):
            yield
            self._sync()

    def _sync(self) -> None:  # a GPU phase ends when its kernels do
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def times(self) -> tuple[dict[str, float], float]:
        """(compute seconds per phase, seconds inside collectives) of the profiled step."""
        assert self.profiler is not None
        events = self.profiler.events()
        comm = _union(
            (e.time_range.start, e.time_range.end)
            for e in events
            if e.name.startswith(("gloo:", "nccl:"))
            or (e.device_type == DeviceType.CUDA and "nccl" in e.name.lower())
        )
        compute = dict.fromkeys(PHASES, 0.0)
        for e in events:
            if e.name.startswith(MARK):
                span = (e.time_range.start, e.time_range.end)
                inside = sum(_overlap(span, c) for c in comm)
                compute[e.name[len(MARK) :]] += (span[1] - span[0] - inside) / 1e6
        return compute, sum(end - start for start, end in comm) / 1e6


class StragglerReport:
    """Every `interval` steps: profile one step, gather the ranks' times, name the stragglers."""

    def __init__(self, interval: int, threshold: float, topology: Any) -> None:
        self.interval, self.threshold, self.topology = interval, threshold, topology
        self.host = socket.gethostname()
        self.delay_seconds, self.delay_from = delay_from_env(topology.rank)

    @property
    def active(self) -> bool:
        """Whether anything is timed (or delayed) at all."""
        return self.interval > 0 or self.delay_seconds > 0

    def timer(self, step: int) -> StepTimer:
        measured = self.interval > 0 and step > 0 and step % self.interval == 0
        return StepTimer(step, measured, self.topology.device)

    def instrument_pipeline(self, engine: Any, timer_of: Any) -> None:
        """Mark the phases inside DeepSpeed's pipeline schedule: the engine looks each
        instruction up in `_INSTRUCTION_MAP`, so an instance copy with marked methods times
        them (the test delay goes into backward here too). `timer_of()` is the step's timer."""
        from deepspeed.runtime.pipe import schedule

        phases = {
            schedule.LoadMicroBatch: "data",
            schedule.ForwardPass: "forward",
            schedule.BackwardPass: "backward",
            schedule.OptimizerStep: "step",
        }
        marked = dict(engine._INSTRUCTION_MAP)
        for kind, phase in phases.items():
            marked[kind] = _marked(engine._INSTRUCTION_MAP[kind], phase, timer_of, self)
        engine._INSTRUCTION_MAP = marked

    def delay(self, step: int) -> None:
        """The test hook's sleep (see SLOW_BACKWARD_ENV)."""
        if self.delay_seconds and step >= self.delay_from:
            time.sleep(self.delay_seconds)

    def gather(self, timer: StepTimer, step: int) -> dict[str, Any]:
        """Collective on measured steps: rank 0 gets the worst straggler's metrics and logs
        every one; other ranks (and unmeasured steps) get {}."""
        if not timer.measured:
            return {}
        compute, wait = timer.times()
        mine = RankTimes(self.topology.rank, self.host, self._coords(), compute, wait)
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
        if not self.topology.is_main:
            return {}
        found = find_stragglers(ranks, self.threshold)
        for r in ranks:
            log.debug(
                "step %d rank %d: compute %s, in collectives %.3f s",
                step,
                r.rank,
                r.compute,
                r.wait,
            )
        for s in found:
            log.warning(
                "straggler at step %d: rank %d (%s) computes %.3f s, %.2fx its peers' median; "
                "slowest in %s (+%.3f s); %.3f s inside collectives",
                step,
                s.times.rank,
                s.times.where(),
                s.times.total,
                s.ratio,
                s.phase,
                s.excess,
                s.times.wait,
            )
        if not found:
            return {}
        worst = found[0]
        return {
            "straggler_rank": worst.times.rank,
            "straggler_ratio": worst.ratio,
            "straggler_phase": worst.phase,
            "straggler_host": worst.times.host,
            "straggler_coords": {k: worst.times.coords[k] for k in ("tp", "pp", "dp")},
        }

    def _coords(self) -> dict[str, int]:
        return {k: int(self.topology.coords[k]) for k in ("tp", "pp", "dp")}


def _marked(method: Any, phase: str, timer_of: Any, report: StragglerReport) -> Any:
    def run(engine: Any, *args: Any, **kwargs: Any) -> Any:
        timer = timer_of()
        with timer.phase(phase):
            if phase == "backward":
                report.delay(timer.step)
            return method(engine, *args, **kwargs)

    return run


def _union(spans: Any) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
