"""The straggler report names the rank that is slow in backward, and nobody when none is.

The slow rank's peers wait for it inside the gradient and TP collectives, so their steps (and
their backward) take as long as its own: only the time outside collectives tells them apart.

The 4-rank runs use a threshold of 24x (not 1.2x) and one 4 s delay in the measured step 6.
Four ranks share two busy CPU cores here, and a rank's compute (~0.02-0.05 s a step) counts the
time the OS keeps it off the CPU: a rank preempted for 0.1-0.3 s is a noise straggler (one with
0.22 s of "compute" had run 0.039 s on its main thread, 32 involuntary context switches).
Measured with two CPU hogs beside the runs (load 7-17), 19 tp2dp2 and 6 pp2dp2 runs, 275
undelayed rank-steps: the worst was 12.0x its peers' median (0.282 s against 0.023 s; at the
former 8x that was a false second straggler, and two peers that slow at once would have hidden
the delayed rank); the peers' median at the delayed step was at most 0.08 s, so the delayed
rank is >= (4 s + compute) / 0.08 s ~ 51x (8 runs of this test under the same load: 56-149x
tp2dp2, 81-288x pp2dp2). 24 is 2x above the worst noise, 2x below the weakest delay. 2 s in
steps 5 and 6 (the former hook) slept as long for half the signal.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util.tensor_util import make_ndarray

from scaletrain.config import check_config
from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError
from scaletrain.train.straggler import (
    SLOW_BACKWARD_ENV,
    RankTimes,
    StragglerReport,
    find_stragglers,
)
from tests.distributed import train_with_output


def _times(rank: int, tp: int, pp: int, dp: int, backward: float, wait: float) -> RankTimes:
    compute = {"data": 0.001, "forward": 0.02, "backward": backward, "step": 0.01}
    return RankTimes(rank, f"host{rank // 2}", {"tp": tp, "pp": pp, "dp": dp}, compute, wait)


def test_slow_rank_found_among_its_stage_only() -> None:
    # tp2 x dp2: rank 3 computes 0.5 s more in backward; the others waited that long.
    ranks = [_times(r, r % 2, 0, r // 2, 0.04, 0.5) for r in range(3)]
    ranks.append(_times(3, 1, 0, 1, 0.54, 0.001))
    (found,) = find_stragglers(ranks, 1.2)
    assert (found.times.rank, found.phase) == (3, "backward")
    assert found.ratio == pytest.approx(0.571 / 0.071)
    assert found.excess == pytest.approx(0.5)
    assert found.times.where() == "host1, tp1 pp0 dp1"
    # pp2 x dp2: stage 1 runs the head (3x the compute) but is compared with itself only.
    stage = [_times(r, 0, r // 2, r % 2, 0.04 if r < 2 else 0.12, 0.0) for r in range(4)]
    assert find_stragglers(stage, 1.2) == []
    stage[1].compute["backward"] = 0.2
    assert [(s.times.rank, s.phase) for s in find_stragglers(stage, 1.2)] == [(1, "backward")]


def _reports(metrics: list[dict]) -> dict[int, tuple]:
    return {
        m["step"]: (m["straggler_rank"], m["straggler_phase"], *m["straggler_coords"].values())
        for m in metrics
        if "straggler_rank" in m
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("layout", "slow_rank", "coords"),
    [(("parallel.tp=2",), 3, (1, 0, 1)), (("parallel.pp=2",), 1, (0, 0, 1))],
    ids=["tp2dp2", "pp2dp2"],
)
def test_report_names_the_delayed_rank(
    tmp_path, stdlib_data, monkeypatch, layout, slow_rank, coords
) -> None:
    # No delay up to step 5 (measured at 2 and 4: nobody), then rank `slow_rank` sleeps 4 s
    # in its backward (measured at 6: that rank, in backward). Threshold 24: module docstring.
    monkeypatch.setenv(SLOW_BACKWARD_ENV, f"{slow_rank}:4.0:6")
    overrides = (
        *layout,
        "parallel.zero_stage=1",
        "train.steps=6",
        "train.seq_len=128",
        "train.micro_batch=4",
        "train.eval_interval=0",
        "logging.straggler_interval=2",
        "fault.straggler_threshold=24",
        "logging.tensorboard=true",  # and the sinks in a real run: rank 0's one event file
    )
    metrics, output = train_with_output(4, tmp_path, stdlib_data, *overrides)
    named = (slow_rank, "backward", *coords)
    assert _reports(metrics) == {6: named}
    assert all(m["straggler_ratio"] > 24 for m in metrics if "straggler_ratio" in m)
    lines = [line for line in output.splitlines() if "straggler at step" in line]
    assert len(lines) == 1, lines
    tp, pp, dp = coords
    assert all(f"rank {slow_rank} (" in line and f"tp{tp} pp{pp} dp{dp})" in line for line in lines)
    assert all("slowest in backward" in line for line in lines)
    (events,) = (tmp_path / "tensorboard").iterdir()
    losses = {
        e.step: make_ndarray(v.tensor).item()
        for e in EventFileLoader(str(events)).Load()
        for v in e.summary.value
        if v.tag == "loss"
    }
    assert losses == {m["step"]: m["loss"] for m in metrics}


def test_bad_settings_are_one_line_config_errors() -> None:
    config = Config()
    config.logging.straggler_interval = -1
    with pytest.raises(ConfigError) as err:
        check_config(config, 1)
    assert str(err.value) == (
        "config error: logging.straggler_interval: must be >= 0 (0 disables), got -1"
    )
    config = Config()
    config.fault.straggler_threshold = 1.0
    with pytest.raises(ConfigError) as err:
        check_config(config, 1)
    assert str(err.value) == (
        "config error: fault.straggler_threshold: must be > 1 (a factor over the peers' median), "
        "got 1.0"
    )


def test_interval_zero_times_nothing(monkeypatch) -> None:
    monkeypatch.delenv(SLOW_BACKWARD_ENV, raising=False)
    topology = SimpleNamespace(rank=0, device=torch.device("cpu"), coords={}, is_main=True)
    off = StragglerReport(0, 1.2, topology)
    assert not off.active
    timer = off.timer(50)
    with timer.running():
        assert isinstance(timer.phase("backward"), contextlib.nullcontext)
    assert timer.profiler is None and off.gather(timer, 50) == {}  # no profile, no collective
    on = StragglerReport(25, 1.2, topology)
    assert [on.timer(s).measured for s in (0, 24, 25, 26, 50)] == [False, False, True, False, True]
