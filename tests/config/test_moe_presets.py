"""The MoE presets at scale: moe-1t's 16,384-GPU layout with pipeline stages and
deepseek-v3-like's 2,048-GPU one pass `scaletrain config check` as their header comments say,
and deepseek-v3-like's parameter counts are the ones its header states."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from scaletrain.cli import main
from scaletrain.config.schema import ModelConfig
from scaletrain.plan.flops import parameter_count

REPO = Path(__file__).resolve().parents[2]
RUN = str(REPO / "configs" / "runs" / "quickstart.yaml")
BATCH = ("train.micro_batch=1", "train.global_batch=4096", "train.seq_len=4096")


@pytest.mark.parametrize(
    ("world", "preset", "layout", "ok"),
    [
        (
            16384,
            "moe-1t",
            ("parallel.tp=8", "parallel.pp=16", "parallel.ep=64"),
            "ok: tp8pp16dp128ep64 on 16384 rank(s), global batch 4096 = micro 1 x accum 32 x "
            "dp 128, vocab 128256 (padded 128256)",
        ),
        (
            2048,
            "deepseek-v3-like",
            ("parallel.pp=16", "parallel.ep=64", "parallel.pipeline_partition=parameters"),
            "ok: tp1pp16dp128ep64 on 2048 rank(s), global batch 4096 = micro 1 x accum 32 x "
            "dp 128, vocab 129280 (padded 129280)",
        ),
    ],
)
def test_preset_layout_at_scale_is_accepted(
    stdlib_data: Path,
    capsys: pytest.CaptureFixture[str],
    world: int,
    preset: str,
    layout: tuple[str, ...],
    ok: str,
) -> None:
    argv = ["config", "check", "--config", RUN, "--world-size", str(world)]
    fields = [f"model.base={preset}", f"data.paths=[{stdlib_data}]", "precision.dtype=bf16"]
    code = main([*argv, *fields, *layout, "parallel.zero_stage=1", *BATCH])
    out, err = capsys.readouterr()
    assert (code, err, out) == (0, "", ok + "\n")
    header = (REPO / "configs" / "models" / f"{preset}.yaml").read_text()
    assert f"--world-size {world}" in header and all(f in header for f in layout)


def test_deepseek_v3_like_counts_699b_total_and_32_8b_active() -> None:
    raw = yaml.safe_load((REPO / "configs" / "models" / "deepseek-v3-like.yaml").read_text())
    cfg = ModelConfig(**raw)
    assert (cfg.num_experts, cfg.moe_top_k, cfg.moe_shared_experts) == (256, 8, 1)
    assert cfg.moe_score_function == "sigmoid" and cfg.moe_router_bias_update_rate > 0
    padded = cfg.padded_vocab_size(cfg.vocab_size)
    assert parameter_count(cfg, padded) / 1e9 == pytest.approx(699.04, abs=0.01)
    assert parameter_count(cfg, padded, active=True) / 1e9 == pytest.approx(32.80, abs=0.01)
    # Per MoE block: 256 + 1 experts of 3 x 7168 x 2048, active 8 + 1 of them.
    expert = 3 * 7168 * 2048
    total_minus_active = parameter_count(cfg, padded) - parameter_count(cfg, padded, active=True)
    assert total_minus_active == 61 * (256 - 8) * expert


def test_planner_stages_hold_every_deepseek_v3_like_weight_once() -> None:
    """`scaletrain plan`'s per-rank weights at pp16 x ep64: every stage's dense weights (shared
    experts and routers included) plus ep x its expert shard add up to parameter_count."""
    from scaletrain.config import check_config, load_config
    from scaletrain.plan.memory import stage_params

    layout = ["parallel.pp=16", "parallel.ep=64", "parallel.pipeline_partition=parameters"]
    fields = ["model.base=deepseek-v3-like", "data.paths=[]", "parallel.zero_stage=1", *layout]
    config = load_config(RUN, [*fields, *BATCH])
    resolved = check_config(config, 2048, check_data=False)
    stages = stage_params(config, resolved)
    held = sum(s.dense for s in stages) + 64 * sum(s.expert for s in stages)
    assert held == parameter_count(config.model, resolved.padded_vocab_size) == 699_044_426_752
