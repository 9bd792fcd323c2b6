"""Pipeline parallelism trains the same model as one rank: PP combined with TP, DP, ZeRO-1,
tied embeddings and both partition methods.

fp32, tiny config, 6 steps. Measured: losses bit-equal to one rank for tp1pp2, pp2 with tied
embeddings, tp2pp2, pp2dp2 (ZeRO-1); tp2pp2dp2 within 1.2e-7 relative (the DP all-reduce
sums in another order). Grad norms within 1.6e-7. The bounds: 1e-5 loss, 1e-4 grad norm.
(The world-4 scaletest in tests/scaletest/ also runs tp2pp2dp1 and tp1pp2dp2 with ZeRO 0/1.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed import assert_losses_close, train

pytestmark = pytest.mark.slow

FP32_REL = 1e-5


@pytest.fixture(scope="module")
def reference(stdlib_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return train(1, tmp_path_factory.mktemp("ref"), stdlib_data)


def test_tp2_pp2_dp2_on_eight_ranks_matches_one(
    stdlib_data: Path, tmp_path: Path, reference: list[dict]
) -> None:
    overrides = ("parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1")
    got = train(8, tmp_path, stdlib_data, *overrides)
    assert_losses_close(got, reference, FP32_REL)
    assert_losses_close(got, reference, FP32_REL, key="val_loss")
    assert_losses_close(got, reference, 1e-4, key="grad_norm")
    manifest = json.loads(
        (tmp_path / "checkpoints" / "step_00000006" / "manifest.json").read_text()
    )
    assert manifest["layout"] == {
        "tp": 2, "pp": 2, "dp": 2, "ep": 1, "zero_stage": 1, "world_size": 8
    }  # fmt: skip
    # Every stage's parameters are recorded, not only rank 0's (layer 0 is the embedding,
    # 1-2 the blocks on either stage, 3 the final norm, 4 the head on the last stage).
    names = set(manifest["parameters"])
    assert {"0.weight", "1.attn.qkv.weight", "2.attn.qkv.weight", "3.weight"} <= names
    assert manifest["parameters"]["4.proj.weight"] == {
        "shape": [256, 64],
        "tp_dim": 0,
        "tp_stride": 1,
    }


def test_tied_embeddings_and_parameter_partition_match_one_rank(
    stdlib_data: Path, tmp_path: Path
) -> None:
    """Three blocks on two stages by weight (an uneven split), the head tied to the embedding
    across the first and the last stage."""
    overrides = ("model.tie_embeddings=true", "model.num_layers=3")
    one = train(1, tmp_path / "one", stdlib_data, *overrides)
    pp2 = train(
        2,
        tmp_path / "pp2",
        stdlib_data,
        *overrides,
        "parallel.pp=2",
        "parallel.pipeline_partition=parameters",
    )
    assert_losses_close(pp2, one, FP32_REL)
    assert_losses_close(pp2, one, FP32_REL, key="val_loss")
    assert_losses_close(pp2, one, 1e-4, key="grad_norm")
