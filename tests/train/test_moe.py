"""Mixture of experts on several ranks trains the same model as on one: EP=2 on ZeRO-1 and
ZeRO-2, TP2 x EP2 on four ranks, and an EP=2 run killed mid-way resumes exactly.

The tiny-moe model (4 experts, top-2, every block MoE) has moe_capacity_factor = experts / k,
so no token is ever dropped and every layout routes every token to the same experts. Measured
against one rank: max relative loss difference 1.2e-7 (summation order), grad norm 1.2e-7,
identical per-expert token counts; the bounds below leave room.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from scaletrain.checkpoint.consolidate import consolidate
from scaletrain.checkpoint.convert import check_reshardable
from scaletrain.checkpoint.manifest import Manifest
from scaletrain.errors import ScaletrainError
from tests.distributed import (
    TINY,
    assert_losses_close,
    rank_pids,
    read_metrics,
    start_script,
    torchrun,
    wait_for_path,
    wait_for_step,
)

pytestmark = pytest.mark.slow

FP32_REL = 1e-5
EXPERTS, TOP_K, LAYERS = 4, 2, 2
TOKENS_PER_STEP = 8 * 32  # tiny: global batch x seq_len


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run with the tiny-moe model."""
    raw = yaml.safe_load(TINY.read_text())
    raw["model"] = "tiny-moe"
    path = tmp_path_factory.mktemp("moe-config") / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def config_args(run: Path, run_dir: Path, data: Path, *overrides: str) -> list[str]:
    config = ("--config", str(run), f"data.paths=[{data}]", f"train.run_dir={run_dir}")
    return [*config, *overrides]


def train_moe(nproc: int, run: Path, run_dir: Path, data: Path, *overrides: str) -> list[dict]:
    torchrun(nproc, "-m", "scaletrain", "train", *config_args(run, run_dir, data, *overrides))
    return read_metrics(run_dir)


@pytest.fixture(scope="module")
def reference(moe_run: Path, stdlib_data: Path, tmp_path_factory) -> list[dict]:
    return train_moe(1, moe_run, tmp_path_factory.mktemp("ref"), stdlib_data)


@pytest.fixture(scope="module")
def ep2_zero1(moe_run: Path, stdlib_data: Path, tmp_path_factory) -> list[dict]:
    """EP=2 over two data-parallel ranks, ZeRO-1 (also the resume test's uninterrupted run)."""
    run_dir = tmp_path_factory.mktemp("ep2-zero1")
    return train_moe(2, moe_run, run_dir, stdlib_data, "parallel.ep=2", "parallel.zero_stage=1")


def assert_same_model(got: list[dict], want: list[dict]) -> None:
    assert_losses_close(got, want, FP32_REL)
    assert_losses_close(got, want, FP32_REL, key="val_loss")
    assert_losses_close(got, want, 1e-4, key="grad_norm")
    assert_losses_close(got, want, 1e-5, key="moe_aux_loss")
    assert [m["moe_expert_tokens"] for m in got] == [m["moe_expert_tokens"] for m in want]


def test_reference_logs_the_router_metrics(reference: list[dict]) -> None:
    assert [m["step"] for m in reference] == [1, 2, 3, 4, 5, 6]
    for m in reference:
        counts = m["moe_expert_tokens"]
        assert len(counts) == EXPERTS
        assert sum(counts) == TOKENS_PER_STEP * TOP_K * LAYERS
        assert m["moe_dropped_fraction"] == 0.0
        assert 0.9 < m["moe_aux_loss"] < 1.5  # 1 for a perfectly balanced router
    assert reference[-1]["loss"] < reference[0]["loss"] - 0.2


def test_ep2_zero1_matches_one_rank(ep2_zero1: list[dict], reference: list[dict]) -> None:
    assert_same_model(ep2_zero1, reference)


def test_ep2_zero2_without_dropping_matches_one_rank(
    moe_run: Path, stdlib_data: Path, tmp_path: Path, reference: list[dict]
) -> None:
    overrides = ("parallel.ep=2", "parallel.zero_stage=2", "model.moe_drop_tokens=false")
    got = train_moe(2, moe_run, tmp_path, stdlib_data, *overrides)
    assert_same_model(got, reference)


def test_tp2_ep2_on_four_ranks_matches_one_rank(
    moe_run: Path, stdlib_data: Path, tmp_path: Path, reference: list[dict]
) -> None:
    # Without dropping: the router rounds each expert's slots up to a multiple of tp, which
    # DeepSpeed's MoE layer splits over the TP ranks (the reference drops nothing either).
    overrides = ("parallel.tp=2", "parallel.ep=2", "parallel.zero_stage=2")
    overrides += ("model.moe_drop_tokens=false",)
    got = train_moe(4, moe_run, tmp_path, stdlib_data, *overrides)
    assert_same_model(got, reference)


def test_ep2_killed_mid_run_resumes_exactly(
    moe_run: Path, stdlib_data: Path, tmp_path: Path, ep2_zero1: list[dict]
) -> None:
    overrides = ("parallel.ep=2", "parallel.zero_stage=1", "checkpoint.interval=3")
    # The last rank hangs before the backward of step 4 (after the step-3 checkpoint), so the
    # run is certainly mid-way when it is killed, however fast the steps are.
    hang = ("tests/train/fault_run.py", "--poison=hang", "--at=4")
    proc = start_script(
        2, tmp_path, *hang, *config_args(moe_run, tmp_path, stdlib_data, *overrides)
    )
    wait_for_step(tmp_path, 3, proc)
    latest = tmp_path / "checkpoints" / "latest"
    wait_for_path(latest, proc)
    ranks = rank_pids(proc)
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=120)
    psutil.wait_procs([psutil.Process(p) for p in ranks if psutil.pid_exists(p)], timeout=60)
    stopped_at = 3
    assert latest.read_text().strip() == f"step_{stopped_at:08d}"
    assert read_metrics(tmp_path)[-1]["step"] == stopped_at

    got = train_moe(2, moe_run, tmp_path, stdlib_data, *overrides)  # the same command again
    keys = ("step", "loss", "val_loss", "lr", "moe_aux_loss", "moe_expert_tokens")
    assert [[m.get(k) for k in keys] for m in got] == [[m.get(k) for k in keys] for m in ep2_zero1]

    # DeepSpeed's expert files (one per layer and global expert; ZeRO keeps the experts'
    # optimizer state in each rank's partition file) are part of the checksummed checkpoint.
    folder = tmp_path / "checkpoints" / f"step_{stopped_at:08d}"
    manifest = Manifest.read(folder)
    assert manifest is not None
    paths = {f["path"] for f in manifest.files}
    experts = {
        f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt"
        for layer in range(LAYERS)
        for e in range(EXPERTS)
    }
    optimizer = {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)}
    assert experts | optimizer <= paths
    # ...a layout change across ep is converted (tests/checkpoint/test_reshard_layouts.py), into
    # ZeRO-3 it is refused in one line...
    check_reshardable(manifest, {**manifest.data["layout"], "ep": 1}, "fp32")
    with pytest.raises(ScaletrainError) as refused:
        check_reshardable(manifest, {**manifest.data["layout"], "ep": 1, "zero_stage": 3}, "fp32")
    assert str(refused.value) == (
        f"resuming {folder.name} (tp1dp2ep2 zero1) at tp1dp2 zero3: across pipeline or expert "
        "layouts resharding reads and writes ZeRO 1/2 partitions only; resume at zero_stage 1 "
        "or 2, save, then switch to ZeRO-3"
    )
    # Consolidation reads the fp32 masters of every global expert of every layer, as saved.
    done = consolidate(folder, tmp_path / "model.safetensors")
    weights = load_file(done.out)
    for layer in range(LAYERS):
        for e in range(EXPERTS):
            name = f"blocks.{layer}.mlp.moe.deepspeed_moe.experts.deepspeed_experts.{e}.down.weight"
            saved = torch.load(
                folder / f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt", weights_only=True
            )
            assert torch.equal(weights[name], saved[name])
