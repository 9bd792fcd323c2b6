"""Resume on another layout: a checkpoint saved at TP2 x DP2 (ZeRO-1) continues at TP1 x DP2,
TP1 x DP4 and other ZeRO stages, through DeepSpeed's universal format.

The resumed run must pick up where the saved one stopped (step, LR schedule, Adam moments, data
position): its next losses match the uninterrupted run's within 1e-5 relative. Not bit-exact:
a different TP degree sums the matmuls in a different order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from scaletrain.checkpoint.convert import (
    check_reshardable,
    describe_layout,
    prune_conversions,
    same_layout,
    universal_info,
)
from scaletrain.checkpoint.manifest import Manifest, tag_for
from scaletrain.errors import ScaletrainError
from tests.distributed import assert_losses_close, read_metrics, train, train_with_output

COMMON = ("train.steps=6", "checkpoint.interval=3", "train.eval_interval=0")
SAVED = (4, ("parallel.tp=2", "parallel.zero_stage=1"))
SAVED_AT = tag_for(3)
RESUMED = {
    "tp1dp2 zero1": (2, ("parallel.zero_stage=1",)),
    "tp1dp4 zero1": (4, ("parallel.zero_stage=1",)),
    "tp1dp2 zero2": (2, ("parallel.zero_stage=2",)),
    "tp1dp2 zero3": (2, ("parallel.zero_stage=3",)),
}


@pytest.fixture(scope="module")
def saved_run(stdlib_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted 6-step run at TP2 x DP2; it also saved the checkpoint at step 3."""
    run_dir = tmp_path_factory.mktemp("tp2dp2-zero1")
    nproc, overrides = SAVED
    train(nproc, run_dir, stdlib_data, *COMMON, *overrides)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("layout", RESUMED)
def test_resume_on_another_layout_continues_the_run(
    layout: str, saved_run: Path, stdlib_data: Path, tmp_path: Path
) -> None:
    want = read_metrics(saved_run)
    saved = saved_run / "checkpoints" / SAVED_AT
    root = tmp_path / "checkpoints"
    shutil.copytree(saved, root / SAVED_AT)
    (root / "latest").write_text(SAVED_AT + "\n")

    nproc, overrides = RESUMED[layout]
    got, output = train_with_output(nproc, tmp_path, stdlib_data, *COMMON, *overrides)

    assert got[0]["step"] == 4
    assert_losses_close(got, want[3:], rel=1e-5)
    assert [m["lr"] for m in got] == [m["lr"] for m in want[3:]]
    assert f"resharding {SAVED_AT} from tp2dp2 zero1 to {layout}" in output
    # The conversion sits beside the checkpoint, whose files stay as the manifest lists them.
    assert (root / ".universal" / SAVED_AT / "zero").is_dir()
    assert _files(root / SAVED_AT) == _files(saved)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ---- the rules, without processes ---------------------------------------------------------

PARAMETERS = {
    "embedding.weight": {"shape": [1024, 64], "tp_dim": 0, "tp_stride": 1},
    "blocks.0.attn.qkv.weight": {"shape": [64, 64], "tp_dim": 0, "tp_stride": 1},
    "blocks.0.attn.out.weight": {"shape": [64, 32], "tp_dim": 1, "tp_stride": 1},
    "blocks.0.mlp.gate_up.weight": {"shape": [128, 64], "tp_dim": 0, "tp_stride": 2},
    "blocks.0.attn_norm.weight": {"shape": [64], "tp_dim": None, "tp_stride": None},
}


def layout(tp: int, dp: int, zero: int) -> dict:
    return {"tp": tp, "pp": 1, "dp": dp, "ep": 1, "zero_stage": zero, "world_size": tp * dp}


def manifest(saved: dict, precision: str = "fp32", parameters: bool = True) -> Manifest:
    data = {"step": 3, "files": [], "layout": saved, "precision": precision}
    if parameters:
        data["parameters"] = PARAMETERS
    return Manifest(Path("/ckpt") / SAVED_AT, data)


def test_universal_info_says_how_each_parameter_is_split() -> None:
    info = universal_info(PARAMETERS)
    assert info["tp_replicated_parameter_patterns"] == [r"blocks\.0\.attn_norm\.weight$"]
    assert info["parameter_with_row_parallelism_patterns"] == [r"blocks\.0\.attn\.out\.weight$"]
    assert info["parameter_with_2_sub_params_cat_dim_0"] == [r"blocks\.0\.mlp\.gate_up\.weight$"]
    assert info["vocabulary_parameter_patterns"] == []  # padded alike at every TP: kept whole
    with pytest.raises(ScaletrainError, match="stride 3"):
        universal_info({"w": {"shape": [9, 4], "tp_dim": 0, "tp_stride": 3}})


def test_layouts_are_compared_and_named() -> None:
    assert describe_layout(layout(2, 2, 1)) == "tp2dp2 zero1"
    assert same_layout(layout(2, 2, 1), layout(2, 2, 1))
    assert not same_layout(layout(2, 2, 1), layout(1, 4, 1))
    assert not same_layout(layout(1, 2, 1), layout(1, 2, 2))


@pytest.mark.parametrize(
    ("saved", "current", "precision", "parameters", "message"),
    [
        (layout(2, 2, 1), layout(1, 2, 0), "fp32", True, "zero_stage=0"),
        (layout(2, 2, 0), layout(1, 2, 1), "fp32", True, "zero_stage=0"),
        (layout(1, 2, 1), layout(2, 1, 3), "fp32", True, "into ZeRO-3"),
        (layout(2, 2, 1), layout(1, 2, 1), "bf16", True, "keeps the precision"),
        (layout(2, 2, 1), layout(1, 2, 1), "fp32", False, "no parameter layout"),
    ],
)
def test_unsupported_reshards_are_refused_in_one_line(
    saved: dict, current: dict, precision: str, parameters: bool, message: str
) -> None:
    with pytest.raises(ScaletrainError, match=message) as error:
        check_reshardable(manifest(saved, parameters=parameters), current, precision)
    assert "\n" not in str(error.value)


def test_supported_reshards_pass() -> None:
    for current in (layout(1, 2, 1), layout(1, 4, 2), layout(1, 4, 3), layout(4, 1, 1)):
        check_reshardable(manifest(layout(2, 2, 1)), current, "fp32")


def test_conversions_of_pruned_checkpoints_are_dropped(tmp_path: Path) -> None:
    conversions = tmp_path / ".universal"
    for name in (tag_for(3), tag_for(6), f".{tag_for(9)}.partial"):
        (conversions / name).mkdir(parents=True)
    (tmp_path / tag_for(6)).mkdir()
    (conversions / tag_for(6) / "source.json").write_text(json.dumps({}))
    prune_conversions(tmp_path)
    assert sorted(p.name for p in conversions.iterdir()) == [tag_for(6)]
