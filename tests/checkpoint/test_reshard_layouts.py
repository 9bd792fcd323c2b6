"""Resume across pipeline and expert layouts, and consolidate bf16 pipeline / MoE checkpoints.

Each resume chain is one uninterrupted run plus two resumes: the run saves at step 3 on layout
A; the first resume starts from it on layout B and saves every step; the second starts from
B's step 4 on layout A again. Both continue the uninterrupted losses within 1e-5 relative (not
bit-exact where TP changes: the matmuls sum in another order), with its learning rates, which
shows the step, LR schedule, Adam moments and data position came along.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from scaletrain.checkpoint.convert import check_reshardable
from scaletrain.checkpoint.manifest import Manifest, tag_for
from scaletrain.checkpoint.zero_state import expert_name, pipeline_name, whole_name
from scaletrain.errors import ScaletrainError
from scaletrain.hf.export import export_hf
from tests.distributed import REPO, TINY, assert_losses_close, read_metrics, run_cli, torchrun
from tests.trainer_script import LIFT_CPU_FP16_GATE

COMMON = ("train.steps=6", "train.eval_interval=0", "parallel.zero_stage=1")
# Block 0 MoE, block 1 dense: pipeline stage 1 has no expert optimizer group. The router bias
# on: a buffer, which the universal loader (parameters only) does not restore.
MOE_PP = ("model.moe_layer_freq=2", "model.moe_router_bias_update_rate=0.01")
TIED = "model.tie_embeddings=true"
CHAINS = {  # name: (model, (ranks, saved layout), (ranks, resumed layout))
    "tp2pp2->tp1pp1->tp1pp2": (  # tied embeddings: a pipeline keeps them as a tied module
        "tiny",
        (4, ("parallel.tp=2", "parallel.pp=2", TIED)),
        (1, (TIED,)),
        (2, ("parallel.pp=2", TIED)),
    ),
    "ep2->ep1->ep2": ("tiny-moe", (2, ("parallel.ep=2",)), (2, ()), (2, ("parallel.ep=2",))),
    "moe-pp2->ep2->pp2": (  # MoE x pipeline
        "tiny-moe",
        (2, ("parallel.pp=2", *MOE_PP)),
        (2, ("parallel.ep=2", *MOE_PP)),
        (2, ("parallel.pp=2", *MOE_PP)),
    ),
}


def _config(root: Path, model: str) -> Path:
    config = root / f"{model}.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(TINY.read_text()), "model": model}))
    return config


def _train(ranks: int, config: Path, data: Path, run_dir: Path, *overrides: str) -> str:
    args = ("--config", str(config), f"data.paths=[{data}]", f"train.run_dir={run_dir}")
    done = torchrun(ranks, "-m", "scaletrain", "train", *args, *COMMON, *overrides)
    return done.stdout + done.stderr


def _start_from(checkpoint: Path, run_dir: Path) -> None:
    root = run_dir / "checkpoints"
    shutil.copytree(checkpoint, root / checkpoint.name)
    (root / "latest").write_text(checkpoint.name + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("chain", list(CHAINS))
def test_resume_across_pipeline_and_expert_layouts(
    chain: str, stdlib_data: Path, tmp_path: Path
) -> None:
    model, (ranks_a, layout_a), (ranks_b, layout_b), (ranks_c, layout_c) = CHAINS[chain]
    config = _config(tmp_path, model)
    whole = tmp_path / "whole"
    _train(ranks_a, config, stdlib_data, whole, "checkpoint.interval=3", *layout_a)
    want = read_metrics(whole)

    first = tmp_path / "first"
    _start_from(whole / "checkpoints" / tag_for(3), first)
    output = _train(ranks_b, config, stdlib_data, first, "checkpoint.interval=1", *layout_b)
    got = read_metrics(first)
    assert [m["step"] for m in got] == [4, 5, 6]
    assert_losses_close(got, want[3:], rel=1e-5)
    assert [m["lr"] for m in got] == [m["lr"] for m in want[3:]]
    assert f"resharding {tag_for(3)} from " in output
    # The data position went on from the saved one: step 6 saved as the uninterrupted run did.
    ends = [Manifest.read(run / "checkpoints" / tag_for(6)) for run in (whole, first)]
    assert all(end is not None for end in ends)
    assert ends[0].data["consumed_samples"] == ends[1].data["consumed_samples"] == 6 * 8
    assert ends[0].data["sampler"] == ends[1].data["sampler"]
    # The router bias each step routed with (None without one): the saved one, bit for bit.
    assert [m.get("moe_router_bias") for m in got] == [m.get("moe_router_bias") for m in want[3:]]
    if "moe_router_bias" in want[0]:  # consolidate carries the bias the live run routed with
        assert want[3]["moe_router_bias"] != [[0.0] * 4]
        out = tmp_path / "whole.safetensors"
        done = run_cli("ckpt", "consolidate", str(whole / "checkpoints" / tag_for(3)), str(out))
        assert done.returncode == 0, done.stderr[-3000:]
        merged = load_file(out)
        biases = [merged[n].tolist() for n in sorted(merged) if n.endswith(".gate.score_bias")]
        assert biases == want[3]["moe_router_bias"]

    second = tmp_path / "second"
    _start_from(first / "checkpoints" / tag_for(4), second)
    _train(ranks_c, config, stdlib_data, second, "checkpoint.interval=3", *layout_c)
    got = read_metrics(second)
    assert [m["step"] for m in got] == [5, 6]
    assert_losses_close(got, want[4:], rel=1e-5)
    assert [m.get("moe_router_bias") for m in got] == [m.get("moe_router_bias") for m in want[4:]]


# ---- consolidation and export of bf16 pipeline / MoE checkpoints --------------------------
ZERO1_BIAS = ("parallel.zero_stage=1", "model.moe_router_bias_update_rate=0.01")
BF16 = {  # name: (model, ranks, overrides)
    "pp2-bf16-tied": ("tiny", 2, ("parallel.pp=2", "parallel.zero_stage=1", TIED)),
    # MoE x pipeline x experts, the router bias on (a buffer, fp32 in a bf16 model)
    "moe-pp2ep2-bf16": ("tiny-moe", 4, ("parallel.pp=2", "parallel.ep=2", *ZERO1_BIAS)),
    # ZeRO-0: DeepSpeed's BF16_Optimizer (pipeline) / FP16_UnfusedOptimizer (MoE, fp16) files
    "pp2-bf16-zero0": ("tiny", 2, ("parallel.pp=2", "parallel.zero_stage=0")),
    "moe-ep2-bf16-zero0": ("tiny-moe", 2, ("parallel.ep=2", "parallel.zero_stage=0")),
    "pp2-fp16-zero0": (
        "tiny",
        2,
        ("parallel.pp=2", "parallel.zero_stage=0", "precision.dtype=fp16"),
    ),
    "moe-pp2-ep2-bf16-zero0": (  # dp2: BF16_Optimizer splits every group over 2 DP ranks
        "tiny-moe",
        4,
        ("parallel.pp=2", "parallel.ep=2", "parallel.zero_stage=0"),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BF16))
def test_bf16_pipeline_and_moe_checkpoints_consolidate_to_the_live_masters(
    name: str, stdlib_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, ranks, overrides = BF16[name]
    low = torch.float16 if "precision.dtype=fp16" in overrides else torch.bfloat16
    monkeypatch.setenv(LIFT_CPU_FP16_GATE, "1")  # fp16 on CPUs without oneDNN fp16 kernels
    run_dir, live_file = tmp_path / "run", tmp_path / "live.safetensors"
    torchrun(
        ranks,
        str(REPO / "tests" / "checkpoint" / "live_weights_run.py"),
        f"--out={live_file}",
        "--config",
        str(_config(tmp_path, model)),
        f"data.paths=[{stdlib_data}]",
        f"train.run_dir={run_dir}",
        "precision.dtype=bf16",
        *overrides,  # may name fp16 instead
    )
    folder = run_dir / "checkpoints" / tag_for(2)
    out = tmp_path / "consolidated.safetensors"
    done = run_cli("ckpt", "consolidate", str(folder), str(out))
    assert done.returncode == 0, done.stderr[-3000:]

    live, merged = load_file(live_file), load_file(out)
    assert sorted(merged) == sorted(live)
    if model == "tiny-moe":  # every global expert under its own name
        experts = [n for n in merged if ".deepspeed_experts." in n]
        assert len(experts) == 2 * 4 * 2  # layers x experts x (gate_up, down)
    bias = ZERO1_BIAS[1] in overrides  # every router's bias, the live one
    assert sum(n.endswith(".gate.score_bias") for n in merged) == (2 if bias else 0)
    for key, want in live.items():
        got = merged[key]
        kept = torch.float32 if key.endswith(".gate.score_bias") else low
        assert got.dtype == torch.float32 and want.dtype == kept, key
        assert torch.equal(got.to(want.dtype), want), key  # the bf16/fp16 weights: the masters'
    # the fp32 masters, not the bf16 copies widened
    assert any(not torch.equal(t, t.to(low).float()) for t in merged.values())

    if model == "tiny-moe" and not bias:  # export hf reads the same masters (Mixtral: no bias)
        export_hf(run_dir, tmp_path / "hf")
        hf = {}
        for path in (tmp_path / "hf").glob("*.safetensors"):
            hf.update(load_file(path))
        expert = ".mlp.moe.deepspeed_moe.experts.deepspeed_experts.3.gate_up.weight"
        gate = merged["blocks.1" + expert].chunk(2)[0]  # expert 3's gate, fp32 master
        stored = hf.get("model.layers.1.block_sparse_moe.experts.3.w1.weight")
        assert stored is not None and torch.equal(stored, gate)


def test_pipeline_and_expert_reshards_into_zero3_are_refused_in_one_line() -> None:
    layout = {"tp": 1, "pp": 2, "dp": 1, "ep": 1, "zero_stage": 1, "world_size": 2}
    data = {"step": 3, "files": [], "layout": layout, "precision": "fp32", "parameters": {}}
    manifest = Manifest(Path("/ckpt") / tag_for(3), data)
    check_reshardable(manifest, {**layout, "pp": 1, "dp": 2}, "fp32")
    with pytest.raises(ScaletrainError) as refused:
        check_reshardable(manifest, {**layout, "pp": 1, "dp": 2, "zero_stage": 3}, "fp32")
    assert str(refused.value) == (
        "resuming step_00000003 (tp1pp2dp1 zero1) at tp1dp2 zero3: across pipeline or expert "
        "layouts resharding reads and writes ZeRO 1/2 partitions only; resume at zero_stage 1 "
        "or 2, save, then switch to ZeRO-3"
    )
    # A LoRA run and a weights-only start load no universal copy: the saved layout only.
    for lora, field, what in [
        (True, "finetune.lora_rank", "a LoRA checkpoint resumes on the layout that saved it only"),
        (
            False,
            "checkpoint.load_weights_only",
            "taking only the weights on another layout is not supported",
        ),
    ]:
        with pytest.raises(ScaletrainError) as refused:
            check_reshardable(manifest, {**layout, "pp": 1, "dp": 2}, "fp32", lora, not lora)
        assert str(refused.value) == f"{field}: /ckpt/step_00000003 is tp1pp2dp1 zero1; {what}"
    moe = Manifest(manifest.folder, {**data, "config": {"model": {"num_experts": 4}}})
    check_reshardable(moe, {**layout, "pp": 1, "dp": 2, "ep": 2}, "fp32")  # MoE x pipeline
    with pytest.raises(ScaletrainError) as refused:
        check_reshardable(moe, {**layout, "pp": 1, "dp": 2, "ep": 2, "zero_stage": 3}, "fp32")
    assert "across pipeline or expert layouts resharding reads and writes ZeRO 1/2" in str(
        refused.value
    )
    with pytest.raises(ScaletrainError) as refused:
        check_reshardable(moe, {**layout, "pp": 1, "dp": 2, "zero_stage": 0}, "fp32")
    assert str(refused.value) == (
        "resuming step_00000003 (tp1pp2dp1 zero1) at tp1dp2 zero0: resharding needs ZeRO stage "
        "1, 2 or 3 on both sides (current layout has zero_stage=0); use parallel.zero_stage>=1, "
        "or resume on the saved layout"
    )


def test_pipeline_and_expert_names_map_both_ways() -> None:
    layers = ["embedding", "blocks.0", "blocks.1", "blocks.10", "norm", "head"]
    for whole, piped in [
        ("embedding.weight", "0.weight"),
        ("blocks.1.attn.qkv.weight", "2.attn.qkv.weight"),
        ("blocks.10.mlp_norm.weight", "3.mlp_norm.weight"),  # not blocks.1's
        ("head.proj.weight", "5.proj.weight"),
    ]:
        assert pipeline_name(whole, layers) == piped
        assert whole_name(piped, layers) == whole
    # a tied embedding is a pipeline's tied module (both end stages hold it)
    assert pipeline_name("embedding.weight", layers, tied=True) == "tied_modules.embedding.weight"
    assert whole_name("tied_modules.embedding.weight", layers) == "embedding.weight"
    local = "blocks.0.mlp.moe.deepspeed_moe.experts.deepspeed_experts.1.down.weight"
    assert expert_name(local, 2) == local.replace("experts.1.", "experts.3.")
    assert expert_name(expert_name(local, 2), -2) == local
