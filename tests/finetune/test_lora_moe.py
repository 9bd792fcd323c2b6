"""LoRA on an MoE model (Mixtral-style): adapters on every block's attention, experts and router
frozen (docs/finetuning.md#lora).

In process: the one-line refusals (adapters on the MLPs, which are experts; a moving router
bias); only the adapters train and DeepSpeed's engine is built blind to the frozen MoE layers
(`scaletrain.engine.frozen_experts`). Multi-process, over a base saved by transformers'
`MixtralForCausalLM` (two torchruns, 4 steps): EP2 (2 ranks, DP2) equals one rank's loss,
validation loss and router numbers within 1e-5 relative; the run resumed at step 2 in the same
ranks continues bit for bit; the base the ranks hold after training is the imported one
(torch.equal); the checkpoint holds the adapters only (no per-expert files) and equals the live
adapters; `export hf --merge-lora` and `--lora-adapter` (peft over the base) give the live
model's logits within 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scaletrain.config.checks import check_config
from scaletrain.config.load import from_dict, load_config
from scaletrain.errors import ScaletrainError
from scaletrain.models.parallel import TensorParallel
from tests.distributed import assert_losses_close, read_metrics, torchrun
from tests.finetune.test_lora import LORA_TINY, _relative, _sha, exported_logits

MOE = ("model.vocab_size=512", "model.num_experts=4", "finetune.lora_targets=[qkv,out]")
RUN_SCRIPT = Path(__file__).with_name("lora_moe_run.py")


def _check(*overrides: str, world_size: int = 1) -> None:
    config = load_config(LORA_TINY, [*MOE, *overrides])
    check_config(config, world_size=world_size, check_data=False)


def test_adapters_on_the_experts_are_refused_in_one_line() -> None:
    _check("parallel.ep=2", world_size=2)  # the attention's adapters at EP2: accepted
    _check("parallel.zero_stage=0", "parallel.ep=2", world_size=2)
    prefix = "config error: finetune.lora_targets: "
    for targets, named in (("[qkv,out,gate_up,down]", ["gate_up", "down"]), ("[down]", ["down"])):
        with pytest.raises(ScaletrainError) as err:  # dense blocks (moe_layer_freq 2) or not
            _check(f"finetune.lora_targets={targets}", f"model.moe_layer_freq={len(named)}")
        assert str(err.value) == (
            f"{prefix}{named} with MoE (model.num_experts 4): the MLPs of an MoE "
            "model are its experts, which take no adapters (nor do the dense blocks' MLPs of "
            "moe_layer_freq > 1); use finetune.lora_targets=[qkv, out]"
        )
    with pytest.raises(ScaletrainError) as err:
        _check("model.moe_router_bias_update_rate=0.001")
    assert str(err.value) == (
        "config error: model.moe_router_bias_update_rate: (0.001) moves the routers' biases, a "
        "part of the frozen base, while LoRA trains; set it to 0 for LoRA"
    )


def test_only_attention_adapters_train_and_the_engine_sees_no_moe(
    tensor_parallel: TensorParallel,
) -> None:
    import deepspeed.runtime.engine as engine_module
    from deepspeed.moe.layer import MoE

    from scaletrain.engine.deepspeed import param_groups
    from scaletrain.engine.frozen_experts import engine_without_moe, frozen_experts
    from scaletrain.models.gpt import GPT
    from scaletrain.models.lora import LoraSpec, freeze_base

    config = load_config(LORA_TINY, list(MOE))
    tp = TensorParallel(1, tensor_parallel.group, LoraSpec.of(config.finetune))
    model = GPT(config.model, 512, tp)
    assert not frozen_experts(model)  # nothing frozen yet
    trainable, frozen = freeze_base(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 2 * 2 * 2 and all(".attn." in n for n in names)  # blocks x qkv/out x A/B
    assert trainable == 2 * (8 * 64 + 128 * 8 + 8 * 64 + 64 * 8)
    expert_params = sum(
        p.numel() for n, p in model.named_parameters() if ".deepspeed_experts." in n
    )
    assert expert_params == 2 * 4 * (256 * 64 + 64 * 128) and frozen > expert_params
    # No optimizer group is an MoE one (DeepSpeed's ZeRO 1/2 would assert that one is) ...
    groups = param_groups(model, weight_decay=0.1)
    assert not any(g.get("moe") for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(names)
    # ... so the engine is built blind to the MoE layers, and only while it is built.
    assert frozen_experts(model)
    with engine_without_moe(model):
        assert not any(isinstance(m, engine_module.MoE) for m in model.modules())
    assert engine_module.MoE is MoE
    next(model.blocks[0].mlp.moe.deepspeed_moe.experts.parameters()).requires_grad_(True)
    assert not frozen_experts(model)  # a trainable expert: DeepSpeed's MoE handling as always
    with engine_without_moe(model):
        assert engine_module.MoE is MoE


# ---- multi-process: EP2 = one rank, exact resume, frozen base, checkpoint, export ---------

STEPS = ("train.steps=4", "checkpoint.interval=2", "optim.lr=0.01", "train.eval_interval=2")


@pytest.fixture(scope="module")
def moe_runs(stdlib_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Mixtral base saved by transformers; LoRA (qkv, out) over it on one rank, and at EP2 on
    two ranks, which then resume the EP2 run at step 2 in a second Trainer (one torchrun)."""
    from tests.hf.test_import import save_mixtral

    root = tmp_path_factory.mktemp("lora-moe")
    base = save_mixtral(root / "base")
    before = _sha(base)
    config = ("--config", str(LORA_TINY), f"data.paths=[{stdlib_data}]")
    config = (*config, f"model.init_from=hf:{base}", "finetune.lora_targets=[qkv,out]", *STEPS)
    runs = {"base": base}
    for name, ranks, extra in (("ep1", 1, ()), ("ep2", 2, ("parallel.ep=2",))):
        resume = ("--resume-dir", str(root / "resumed"), "--resume-step", "2")
        live = ("--out", str(root / f"{name}.safetensors"), *(resume if ranks == 2 else ()))
        run = (str(RUN_SCRIPT), *live, *config, *extra, f"train.run_dir={root / name}")
        done = torchrun(ranks, *run)
        (root / name / "output.log").write_text(done.stdout + done.stderr)
        runs[name] = root / name
    runs["resumed"] = root / "resumed"
    assert _sha(base) == before  # the base is read, never written
    return runs


def _live(runs: dict[str, Path], name: str, resumed: bool = False) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = runs[name].with_suffix(".safetensors")
    return load_file(path.with_suffix(".resumed") if resumed else path)


@pytest.mark.slow
def test_ep2_equals_one_rank_and_resumes_exactly(moe_runs: dict[str, Path]) -> None:
    ep1, ep2, resumed = (read_metrics(moe_runs[n]) for n in ("ep1", "ep2", "resumed"))
    assert ep1[-1]["loss"] < ep1[0]["loss"]
    for key in ("loss", "val_loss", "moe_aux_loss"):  # the router losses are still computed
        assert_losses_close(ep2, ep1, rel=1e-5, key=key)
    assert all(m["moe_aux_loss"] > 0 for m in ep2)
    assert [m["moe_expert_tokens"] for m in ep2] == [m["moe_expert_tokens"] for m in ep1]
    keys = ("step", "loss", "val_loss", "lr", "grad_norm", "moe_aux_loss", "moe_expert_tokens")
    assert [[m.get(k) for k in keys] for m in resumed] == [
        [m.get(k) for k in keys] for m in ep2[2:]
    ]
    final, again = _live(moe_runs, "ep2"), _live(moe_runs, "ep2", resumed=True)
    assert final.keys() == again.keys()
    assert all(torch.equal(again[name], final[name]) for name in final)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ep1", "ep2"])
def test_the_base_stays_the_imported_one(moe_runs: dict[str, Path], layout: str) -> None:
    """Every expert (of both EP ranks), router, attention and embedding weight the ranks hold
    after 4 steps is the Hugging Face base's, bit for bit; only the adapters moved."""
    from scaletrain.hf.imports import full_weights, read_hf_weights

    live = _live(moe_runs, layout)
    manifest = json.loads(
        (moe_runs[layout] / "checkpoints" / "step_00000004" / "manifest.json").read_text()
    )
    cfg = from_dict(manifest["config"]).model
    padded = cfg.padded_vocab_size(cfg.vocab_size)
    base = full_weights(read_hf_weights(moe_runs["base"]), cfg, padded, "base")
    adapters = {n for n in live if n.endswith((".lora_A", ".lora_B"))}
    assert set(live) - adapters == set(base)
    assert sum(".deepspeed_experts." in n for n in base) == 2 * 4 * 2  # blocks x experts x 2
    assert all(torch.equal(live[name], base[name]) for name in base)
    assert all(live[n].abs().max() > 0 for n in adapters if n.endswith(".lora_B"))


@pytest.mark.slow
def test_checkpoint_holds_the_adapters_and_the_base_source(moe_runs: dict[str, Path]) -> None:
    from scaletrain.checkpoint.consolidate import consolidated_weights

    folder = moe_runs["ep2"] / "checkpoints" / "step_00000004"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["lora_base"] == {"init_from": f"hf:{moe_runs['base'].resolve()}"}
    assert sorted(manifest["parameters"]) == sorted(
        f"blocks.{i}.attn.{t}.{w}"
        for i in (0, 1)
        for t in ("qkv", "out")
        for w in ("lora_A", "lora_B")
    )
    # No per-expert files (DeepSpeed writes one per expert, frozen weights and all, when its
    # MoE handling is on); the module's file holds the 8 adapters and nothing else.
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json",
        "mp_rank_00_model_states.pt",
        "rng",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    module = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    saved = sorted(k for k, v in module.items() if torch.is_tensor(v) and v.numel())
    assert saved == sorted(manifest["parameters"])
    _, adapters = consolidated_weights(folder)
    live = _live(moe_runs, "ep2")
    assert sorted(adapters) == saved
    assert all(torch.equal(adapters[name], live[name]) for name in saved)


@pytest.mark.slow
def test_export_merged_and_adapter_give_the_live_logits(
    moe_runs: dict[str, Path], tmp_path: Path, tensor_parallel: TensorParallel
) -> None:
    from scaletrain.cli import main
    from scaletrain.models.lora import LoraSpec
    from tests.hf.conftest import scaletrain_logits

    run, base = moe_runs["ep2"], moe_runs["base"]
    assert main(["export", "hf", str(run), str(tmp_path / "merged"), "--merge-lora"]) == 0
    assert main(["export", "hf", str(run), str(tmp_path / "adapter"), "--lora-adapter"]) == 0
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged_config["architectures"] == ["MixtralForCausalLM"]
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    manifest = json.loads((run / "checkpoints" / "step_00000004" / "manifest.json").read_text())
    config = from_dict(manifest["config"])
    tp = TensorParallel(1, tensor_parallel.group, LoraSpec.of(config.finetune))
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = scaletrain_logits(_live(moe_runs, "ep2"), config.model, tp, tokens)  # unmerged
    merged, peft, plain = exported_logits(tmp_path, base, tokens)
    assert _relative(merged, ours) < 1e-5
    assert _relative(peft, ours) < 1e-5
    assert _relative(plain, ours) > 1e-3  # the adapters do change the model
