"""Every layout trains the same model: what the world-4 scaletest does not cover.

The tiny config runs 6 fp32 steps on real text. Reference: one rank, ZeRO-0. Tolerances are
relative; measured differences are 0 to ~1e-7 (summation order), the bounds leave room.

DP=2/4, ZeRO 1-3, TP=2 x DP=2 (ZeRO 0-3), PP=2 (x TP=2, x DP=2) and gradient accumulation
(dp4 accumulates 1 micro-batch, the reference 4) are compared step by step, loss and gradient
norm, in one process group by tests/scaletest/test_scaletest.py. Here: the validation loss
under TP, and tied embeddings split over TP inside ZeRO-3.
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
