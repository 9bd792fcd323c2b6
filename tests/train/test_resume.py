"""Exact resume: a run killed (or stopped) at a random step continues the identical loss curve.

Losses are compared with ==, not a tolerance: with one thread per rank the CPU is deterministic,
so a resumed run that is off by one ulp has lost some state.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import psutil
import pytest

from tests.distributed import (
    TINY,
    launcher_log,
    rank_pids,
    read_metrics,
    start_script,
    start_training,
    train,
    train_with_output,
    wait_for_path,
    wait_for_step,
)

pytestmark = pytest.mark.slow

COMMON = ("train.steps=8", "checkpoint.interval=2", "train.eval_interval=4")
LAYOUTS = {
    "tp1dp2-zero1": (2, ("parallel.zero_stage=1",)),
    "tp2dp2-zero3": (4, ("parallel.tp=2", "parallel.zero_stage=3")),
    "bf16-tp1dp2-zero1": (2, ("parallel.zero_stage=1", "precision.dtype=bf16")),
    "pp2-tied": (2, ("parallel.pp=2", "model.tie_embeddings=true")),
}
_uninterrupted: dict[str, list[dict]] = {}


def uninterrupted(layout: str, data: Path, tmp: Path) -> list[dict]:
    if layout not in _uninterrupted:
        nproc, overrides = LAYOUTS[layout]
        _uninterrupted[layout] = train(nproc, tmp / f"full-{layout}", data, *COMMON, *overrides)
    return _uninterrupted[layout]


def curve(metrics: list[dict]) -> list[tuple]:
    return [(m["step"], m["loss"], m.get("val_loss"), m["lr"]) for m in metrics]


def wait_gone(pids: list[int], timeout: float = 60) -> None:
    _, alive = psutil.wait_procs(
        [psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=timeout
    )
    assert not alive, f"ranks still alive: {alive}"


@pytest.mark.parametrize(
    ("layout", "victim", "seed"),
    [
        ("tp1dp2-zero1", "rank", 11),
        ("tp1dp2-zero1", "launcher", 12),
        ("tp2dp2-zero3", "rank", 13),
        ("bf16-tp1dp2-zero1", "rank", 14),
        ("pp2-tied", "rank", 15),
    ],
)
def test_kill_9_then_resume_is_bit_exact(
    layout: str, victim: str, seed: int, stdlib_data: Path, tmp_path_factory, tmp_path: Path
) -> None:
    want = uninterrupted(layout, stdlib_data, tmp_path_factory.getbasetemp())
    nproc, overrides = LAYOUTS[layout]
    chooser = random.Random(seed)
    kill_step = chooser.randint(3, 7)
    proc = start_training(nproc, tmp_path, stdlib_data, *COMMON, *overrides)
    wait_for_step(tmp_path, kill_step, proc)
    ranks = rank_pids(proc)
    os.kill(proc.pid if victim == "launcher" else chooser.choice(ranks), signal.SIGKILL)
    proc.wait(timeout=120)
    wait_gone(ranks)
    assert read_metrics(tmp_path)[-1]["step"] < 8, "the run finished before the kill"

    got = train(nproc, tmp_path, stdlib_data, *COMMON, *overrides)  # the same command again
    assert curve(got) == curve(want)


@pytest.mark.parametrize(
    ("victim", "signum"), [("rank", signal.SIGUSR1), ("launcher", signal.SIGTERM)]
)
def test_stop_signal_saves_exits_75_and_resumes_exactly(
    victim: str, signum: signal.Signals, stdlib_data: Path, tmp_path_factory, tmp_path: Path
) -> None:
    want = uninterrupted("tp1dp2-zero1", stdlib_data, tmp_path_factory.getbasetemp())
    nproc, overrides = LAYOUTS["tp1dp2-zero1"]
    proc = start_training(nproc, tmp_path, stdlib_data, *COMMON, *overrides)
    wait_for_step(tmp_path, 3, proc)
    # One rank is enough (the ranks agree); torchrun passes SIGTERM on to every rank.
    os.kill(rank_pids(proc)[-1] if victim == "rank" else proc.pid, signum)
    proc.wait(timeout=120)
    log = launcher_log(tmp_path)
    stopped_at = read_metrics(tmp_path)[-1]["step"]
    assert 3 <= stopped_at < 8
    assert f"stopped after step {stopped_at} (signal {signum.name})" in log
    if victim == "rank":  # torchrun reports its workers' exit codes
        assert "exitcode  : 75" in log or "exitcode: 75" in log
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped_at:08d}"

    got = train(nproc, tmp_path, stdlib_data, *COMMON, *overrides)
    assert curve(got) == curve(want)


def test_corrupt_checkpoints_fall_back_to_the_previous_good_one(
    stdlib_data: Path, tmp_path: Path
) -> None:
    nproc, overrides = LAYOUTS["tp1dp2-zero1"]
    first = train(nproc, tmp_path, stdlib_data, *COMMON, *overrides)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == [
        "step_00000004",
        "step_00000006",
        "step_00000008",
    ]
    manifest = json.loads((root / "step_00000008" / "manifest.json").read_text())
    consumed = 8 * 8  # steps x global batch
    assert (manifest["step"], manifest["consumed_samples"]) == (8, consumed)
    assert manifest["consumed_tokens"] == consumed * 32
    assert manifest["sampler"]["consumed_samples"] == consumed
    assert manifest["layout"] == {
        "tp": 1,
        "pp": 1,
        "dp": 2,
        "ep": 1,
        "zero_stage": 1,
        "world_size": 2,
    }
    assert manifest["lr_schedule"]["last_epoch"] == 8 and manifest["loss_scale"] is None
    assert manifest["lr_schedule"]["last_lr"][0] == pytest.approx(3e-4)  # tiny: min_lr at the end
    assert manifest["config"]["train"]["steps"] == 8
    paths = {f["path"] for f in manifest["files"]}
    assert {"rng/rank_00000.pt", "rng/rank_00001.pt", "mp_rank_00_model_states.pt"} <= paths
    truncated = root / "step_00000008" / "mp_rank_00_model_states.pt"
    first_size = truncated.stat().st_size
    truncated.write_bytes(truncated.read_bytes()[:1000])
    flipped = root / "step_00000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))

    done, output = train_with_output(nproc, tmp_path, stdlib_data, *COMMON, *overrides)
    assert curve(done) == curve(first)
    warnings = [
        line.split(" WARNING ", 1)[1] for line in output.splitlines() if " WARNING " in line
    ]
    assert warnings == [
        f"checkpoint {root}/step_00000008 is not usable (mp_rank_00_model_states.pt has 1000 "
        f"bytes, manifest says {first_size} (truncated?)); trying the one before",
        f"checkpoint {root}/step_00000006 is not usable "
        "(zero_pp_rank_1_mp_rank_00_optim_states.pt fails its checksum (corrupted)); "
        "trying the one before",
    ]
    assert "resumed from" in output and "step_00000004 (step 4)" in output


def test_kill_during_a_save_leaves_the_previous_checkpoint_visible(
    stdlib_data: Path, tmp_path_factory, tmp_path: Path
) -> None:
    want = uninterrupted("tp1dp2-zero1", stdlib_data, tmp_path_factory.getbasetemp())
    nproc, overrides = LAYOUTS["tp1dp2-zero1"]
    config = ("--config", str(TINY), f"data.paths=[{stdlib_data}]", f"train.run_dir={tmp_path}")
    proc = start_script(
        nproc,
        tmp_path,
        "tests/train/fault_run.py",
        "--poison=slow-save",
        "--at=4",
        *config,
        *COMMON,
        *overrides,
    )
    staging = tmp_path / "checkpoints" / ".staging" / "step_00000004"
    wait_for_path(staging / "mp_rank_00_model_states.pt", proc)
    ranks = rank_pids(proc)
    os.kill(ranks[0], signal.SIGKILL)
    proc.wait(timeout=120)
    wait_gone(ranks)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002"]

    got = train(nproc, tmp_path, stdlib_data, *COMMON, *overrides)
    assert curve(got) == curve(want)
    assert not staging.exists()


def test_time_limit_saves_and_exits_75_before_the_limit(stdlib_data: Path, tmp_path: Path) -> None:
    nproc, overrides = LAYOUTS["tp1dp2-zero1"]
    proc = start_training(
        nproc,
        tmp_path,
        stdlib_data,
        "train.steps=100000",
        "train.time_limit=00:00:15",
        "train.eval_interval=0",
        *overrides,
    )
    proc.wait(timeout=300)
    log = launcher_log(tmp_path)
    last = read_metrics(tmp_path)[-1]["step"]
    assert 1 < last < 100000
    assert f"stopped after step {last} (time limit)" in log
    assert "exitcode  : 75" in log or "exitcode: 75" in log
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{last:08d}"


def test_load_weights_only_starts_a_new_run_from_trained_weights(
    stdlib_data: Path, tmp_path: Path
) -> None:
    nproc, overrides = LAYOUTS["tp1dp2-zero1"]
    donor = train(nproc, tmp_path / "donor", stdlib_data, *COMMON, *overrides)
    source = tmp_path / "donor" / "checkpoints" / "step_00000008"
    fresh = train(nproc, tmp_path / "fresh", stdlib_data, *COMMON, *overrides)
    # Another run's checkpoint needs no opt-in: every file is loaded weights-only, wherever
    # it lives (tests/checkpoint/test_pickle_safety.py refuses one that holds more).
    new = ("checkpoint.load_weights_only=true", f"checkpoint.resume={source}")
    got = train(nproc, tmp_path / "new", stdlib_data, *COMMON, *overrides, *new)
    assert [m["step"] for m in got] == list(range(1, 9))  # a new run: step 1, fresh schedule
    assert [m["lr"] for m in got] == [m["lr"] for m in fresh]
    # The same first batch as the fresh run, but trained weights: a much lower loss.
    assert got[0]["loss"] < fresh[0]["loss"] - 0.5
    assert got[0]["loss"] < donor[0]["loss"] - 0.5
