"""Every layout trains the same model: losses of TP, DP, ZeRO and accumulation variants.

The tiny config runs 6 fp32 steps on real text. Reference: one rank, ZeRO-0. Tolerances are
relative; measured differences are 0 to ~1e-7 (summation order), the bounds leave room.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed import assert_losses_close, train

pytestmark = pytest.mark.slow

FP32_REL = 1e-5


@pytest.fixture(scope="module")
def reference(stdlib_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return train(1, tmp_path_factory.mktemp("ref"), stdlib_data)


def test_reference_learns_and_logs_every_key(reference: list[dict]) -> None:
    assert [m["step"] for m in reference] == [1, 2, 3, 4, 5, 6]
    keys = {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "peak_mem_bytes"}
    assert all(keys <= m.keys() for m in reference)
    assert [m["step"] for m in reference if "val_loss" in m] == [3, 6]
    assert reference[-1]["loss"] < reference[0]["loss"] - 0.2
    assert all(m["grad_norm"] > 0 and m["peak_mem_bytes"] > 0 for m in reference)


def test_tp2_matches_tp1(stdlib_data: Path, tmp_path: Path, reference: list[dict]) -> None:
    got = train(2, tmp_path, stdlib_data, "parallel.tp=2")
    assert_losses_close(got, reference, FP32_REL)
    assert_losses_close(got, reference, FP32_REL, key="val_loss")
    assert_losses_close(got, reference, 1e-4, key="grad_norm")


def test_dp2_matches_dp1(stdlib_data: Path, tmp_path: Path, reference: list[dict]) -> None:
    got = train(2, tmp_path, stdlib_data)
    assert_losses_close(got, reference, FP32_REL)
    assert_losses_close(got, reference, FP32_REL, key="val_loss")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_matches_zero0(
    stage: int, stdlib_data: Path, tmp_path: Path, reference: list[dict]
) -> None:
    got = train(2, tmp_path, stdlib_data, f"parallel.zero_stage={stage}")
    assert_losses_close(got, reference, FP32_REL)
    assert_losses_close(got, reference, 1e-4, key="grad_norm")


@pytest.mark.parametrize("stage", [1, 3])
def test_tp2_dp2_on_four_ranks_matches_one(
    stage: int, stdlib_data: Path, tmp_path: Path, reference: list[dict]
) -> None:
    got = train(4, tmp_path, stdlib_data, "parallel.tp=2", f"parallel.zero_stage={stage}")
    assert_losses_close(got, reference, FP32_REL)
    assert_losses_close(got, reference, FP32_REL, key="val_loss")


def test_grad_accumulation_matches_one_big_micro_batch(stdlib_data: Path, tmp_path: Path) -> None:
    accum = train(1, tmp_path / "accum", stdlib_data, "train.micro_batch=1", "train.global_batch=4")
    big = train(1, tmp_path / "big", stdlib_data, "train.micro_batch=4", "train.global_batch=4")
    assert_losses_close(accum, big, FP32_REL)


def test_tied_embeddings_tp2_zero3_match_one_rank(stdlib_data: Path, tmp_path: Path) -> None:
    one = train(1, tmp_path / "one", stdlib_data, "model.tie_embeddings=true")
    tp2 = train(
        2,
        tmp_path / "tp2",
        stdlib_data,
        "model.tie_embeddings=true",
        "parallel.tp=2",
        "parallel.zero_stage=3",
    )
    assert_losses_close(tp2, one, FP32_REL)
