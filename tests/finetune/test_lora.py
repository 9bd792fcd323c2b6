"""LoRA (`finetune.lora_*`) on the megatron-core parallel layers.

In process: the config's one-line refusals; an adapter layer computes W x + alpha / r * B A x;
only the adapters train (the base stays bit for bit, no optimizer state: the model-state bytes
measured). Multi-process, over a base made with transformers' own classes (one torchrun per
layout, 6 steps): TP2, DP2 ZeRO-3 and PP2 losses equal TP1's within 1e-5, ZeRO-3 holds half of
the frozen base per rank, the ZeRO-3 run resumed at step 3 continues its loss curve bit for bit,
each layout's checkpoint holds the adapters plus the base's source, and `export hf --merge-lora
/ --lora-adapter` of each give transformers (and peft over the base) the unmerged model's
logits within 1e-5.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from scaletrain.config.checks import check_config
from scaletrain.config.load import from_dict, load_config
from scaletrain.config.schema import FinetuneConfig, ModelConfig
from scaletrain.errors import ScaletrainError
from scaletrain.models.parallel import TensorParallel
from tests.distributed import REPO, read_metrics, torchrun

LORA_TINY = REPO / "configs" / "runs" / "lora-tiny.yaml"
SMALL = ModelConfig(
    vocab_size=128,
    hidden_size=64,
    ffn_hidden_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_seq_len=32,
)


def _refusal(*overrides: str, world_size: int = 1) -> str:
    config = load_config(LORA_TINY, ["model.vocab_size=512", *overrides])
    with pytest.raises(ScaletrainError) as err:
        check_config(config, world_size=world_size, check_data=False)
    return str(err.value)


def test_finetune_fields_are_checked_in_one_line() -> None:
    prefix = "config error: finetune."
    assert _refusal("finetune.lora_rank=-1") == f"{prefix}lora_rank: must be >= 0 (0 = off), got -1"
    assert _refusal("finetune.lora_alpha=0") == f"{prefix}lora_alpha: must be > 0, got 0.0"
    assert _refusal("finetune.lora_dropout=1.0") == (
        f"{prefix}lora_dropout: must be in [0, 1), got 1.0"
    )
    assert _refusal("finetune.lora_targets=[qkv,mlp]") == (
        f"{prefix}lora_targets: ['qkv', 'mlp'] must be a non-empty list of qkv, out, gate_up, down"
    )
    assert _refusal("finetune.lora_targets=[out,out]") == (
        f"{prefix}lora_targets: ['out', 'out'] names a layer twice"
    )
    assert _refusal("model.num_experts=4").startswith(  # tests/finetune/test_lora_moe.py
        f"{prefix}lora_targets: ['gate_up', 'down'] with MoE (model.num_experts 4): "
    )
    off = load_config(LORA_TINY, ["model.vocab_size=512", "finetune.lora_rank=0"])
    check_config(off, world_size=1, check_data=False)  # 0 is off: nothing else is checked
    # A base from a scaletrain checkpoint: tests/finetune/test_lora_ckpt_base.py.
    allowed = [("parallel.zero_stage=3", 2), ("parallel.pp=2", 2)]
    allowed.append(("checkpoint.load_weights_only=true", 1))
    for layout, ranks in allowed:
        config = load_config(LORA_TINY, ["model.vocab_size=512", layout])
        check_config(config, world_size=ranks, check_data=False)


def test_resume_needs_the_lora_settings_that_saved() -> None:
    from scaletrain.config.load import to_dict
    from scaletrain.config.lora import check_lora_resume

    lora = load_config(LORA_TINY)
    saved = {"config": to_dict(lora)}
    check_lora_resume(saved, lora)  # the same settings continue
    check_lora_resume({"config": {}}, load_config(LORA_TINY, ["finetune.lora_rank=0"]))
    other = load_config(LORA_TINY, ["finetune.lora_rank=4", "finetune.lora_targets=[qkv]"])
    with pytest.raises(ScaletrainError) as err:
        check_lora_resume(saved, other)
    assert str(err.value) == (
        "config error: checkpoint.resume: the checkpoint's LoRA settings differ "
        "(finetune.lora_rank 8 -> 4, finetune.lora_targets ['qkv', 'out', 'gate_up', 'down'] "
        "-> ['qkv']); use them, or start fresh with checkpoint.resume=none or a new "
        "train.run_dir"
    )
    with pytest.raises(ScaletrainError, match=r"differ \(finetune.lora_rank 0 -> 8\); use"):
        check_lora_resume({"config": {"finetune": {"lora_rank": 0}}}, lora)  # a full checkpoint


def _models(tensor_parallel: TensorParallel, **lora):
    from scaletrain.models.gpt import GPT
    from scaletrain.models.lora import LoraSpec

    spec = LoraSpec.of(FinetuneConfig(lora_rank=4, lora_alpha=8.0, **lora))
    torch.manual_seed(5)
    plain = GPT(SMALL, 128, tensor_parallel)
    torch.manual_seed(5)
    adapted = GPT(SMALL, 128, TensorParallel(1, tensor_parallel.group, spec))
    return plain, adapted


def test_adapter_layers_add_scaled_low_rank_update(tensor_parallel: TensorParallel) -> None:
    _, model = _models(tensor_parallel)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    for layer, inputs in ((model.blocks[0].attn.qkv, x), (model.blocks[0].mlp.down, None)):
        inputs = inputs if inputs is not None else torch.randn(3, 5, 128)
        with torch.no_grad():
            layer.lora_B.normal_()
            got, _ = layer(inputs)
            want = inputs @ layer.weight.T + 2.0 * inputs @ layer.lora_A.T @ layer.lora_B.T
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The split a checkpoint records: B like the base's rows (gate|up stride 2), A like its columns.
    gate_up, down = model.blocks[0].mlp.gate_up, model.blocks[0].mlp.down
    assert (gate_up.lora_B.partition_dim, gate_up.lora_B.partition_stride) == (0, 2)
    assert not getattr(gate_up.lora_A, "tensor_model_parallel", False)
    assert (down.lora_A.partition_dim, down.lora_A.partition_stride) == (1, 1)
    assert not getattr(down.lora_B, "tensor_model_parallel", False)


def _model_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Weights + gradients + AdamW moments held after a step."""
    tensors = [p for p in model.parameters()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [t for s in optimizer.state.values() for t in s.values() if t.dim() > 0]
    return sum(t.numel() * t.element_size() for t in tensors)


def test_only_adapters_train_and_model_states_shrink(tensor_parallel: TensorParallel) -> None:
    from scaletrain.engine.deepspeed import param_groups
    from scaletrain.models.lora import freeze_base

    plain, model = _models(tensor_parallel)
    base = {k: v.clone() for k, v in plain.state_dict().items() if v is not None}
    adapted = {k: v for k, v in model.state_dict().items() if v is not None}
    assert all(torch.equal(adapted[k], v) for k, v in base.items())  # same base weights
    trainable, frozen = freeze_base(model)
    n_plain = sum(p.numel() for p in plain.parameters())
    assert frozen == n_plain and trainable == 2 * 4 * (64 + 128 + 64 + 64 + 64 + 256 + 128 + 64)
    groups = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for g in groups for p in g["params"]) == sorted(
        n for n in names.values() if n.endswith((".lora_A", ".lora_B"))
    )
    window = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(2))
    assert model(window).item() == plain(window).item()  # B starts at zero
    measured = {}
    for name, net in (("full", plain), ("lora", model)):
        optimizer = torch.optim.AdamW(param_groups(net, 0.1), lr=1e-2)
        net(window).backward()
        optimizer.step()
        measured[name] = _model_state_bytes(net, optimizer)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())  # base frozen
    assert model.blocks[1].mlp.gate_up.lora_B.abs().sum() > 0  # the adapters moved
    # fp32: 16 bytes per trained parameter (weight, grad, 2 moments), 4 per frozen one.
    assert measured["full"] == 16 * n_plain
    assert measured["lora"] == 4 * (n_plain + trainable) + 12 * trainable


# ---- multi-process: TP equality, exact resume, checkpoints, export ------------------------

COMMON = ("train.steps=6", "checkpoint.interval=3", "optim.lr=0.01", "train.eval_interval=3")


def _sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


RUNS = {  # name: (ranks, overrides), each from the same base; "resumed" restarts "z3" at step 3
    "tp1": (1, ()),
    "tp2": (2, ("parallel.tp=2",)),
    "z3": (2, ("parallel.zero_stage=3",)),  # DP2: the frozen base partitioned over both ranks
    "pp2": (2, ("parallel.pp=2",)),
    "resumed": (2, ("parallel.zero_stage=3",)),
}


@pytest.fixture(scope="module")
def lora_runs(stdlib_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base saved by transformers; LoRA over it at TP1, TP2, DP2 ZeRO-3 and PP2, and the
    ZeRO-3 run resumed at step 3. Each run's output is kept in its `output.log`."""
    from tests.hf.test_import import save_llama

    root = tmp_path_factory.mktemp("lora")
    base = save_llama(root / "base")
    before = _sha(base)
    config = ("--config", str(LORA_TINY), f"data.paths=[{stdlib_data}]")
    config = (*config, f"model.init_from=hf:{base}")
    runs = {"base": base}
    resume = f"checkpoint.resume={root / 'z3' / 'checkpoints' / 'step_00000003'}"
    for name, (ranks, extra) in RUNS.items():
        run = ("-m", "scaletrain", "train", *config, *COMMON, f"train.run_dir={root / name}")
        done = torchrun(ranks, *run, *extra, *((resume,) if name == "resumed" else ()))
        (root / name / "output.log").write_text(done.stdout + done.stderr)
        runs[name] = root / name
    assert _sha(base) == before  # the base is read, never written
    return runs


@pytest.mark.slow
def test_lora_layouts_equal_one_rank_and_resume_exactly(lora_runs: dict[str, Path]) -> None:
    from tests.distributed import assert_losses_close

    tp1, z3, resumed = (read_metrics(lora_runs[n]) for n in ("tp1", "z3", "resumed"))
    assert tp1[-1]["loss"] < tp1[0]["loss"]
    for name in ("tp2", "z3", "pp2"):
        metrics = read_metrics(lora_runs[name])
        assert_losses_close(metrics, tp1, rel=1e-5)
        assert_losses_close(metrics, tp1, rel=1e-5, key="val_loss")
    curve = [(m["step"], m["loss"], m.get("val_loss"), m["lr"]) for m in resumed]
    assert curve == [(m["step"], m["loss"], m.get("val_loss"), m["lr"]) for m in z3[3:]]


@pytest.mark.slow
def test_zero3_partitions_the_frozen_base(lora_runs: dict[str, Path]) -> None:
    """Rank 0 of the DP2 ZeRO-3 run holds half of every frozen base weight (all even-sized)."""
    found = [
        line.split("INFO ", 1)[1]
        for line in (lora_runs["z3"] / "output.log").read_text().splitlines()
        if "LoRA: " in line
    ]
    assert found == [
        "LoRA: 13312 adapter parameters train, 139584 base ones frozen, 69792 of them held on "
        "this rank"
    ]


WEIGHT_FILES = {  # where each layout's DeepSpeed files keep the module's weights
    "tp2": ("mp_rank_0[01]_model_states.pt", "module"),
    "z3": ("zero_pp_rank_[01]_mp_rank_00_model_states.pt", "module"),  # ZeRO-3 placeholders
    "pp2": ("layer_0[0-4]-model_00-model_states.pt", None),  # one file per pipeline layer
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(WEIGHT_FILES))
def test_lora_checkpoint_holds_adapters_and_the_base(
    lora_runs: dict[str, Path], layout: str
) -> None:
    from scaletrain.checkpoint.consolidate import consolidated_weights

    folder = lora_runs[layout] / "checkpoints" / "step_00000006"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["lora_base"] == {"init_from": f"hf:{lora_runs['base'].resolve()}"}
    assert all(n.endswith((".lora_A", ".lora_B")) for n in manifest["parameters"])
    assert len(manifest["parameters"]) == 2 * 2 * 4  # 2 blocks x 4 targets x (A, B)
    pattern, key = WEIGHT_FILES[layout]
    files = sorted(folder.glob(pattern))
    assert len(files) == (5 if layout == "pp2" else 2)
    saved = []
    for path in files:
        states = torch.load(path, weights_only=False)
        saved += [k for k, v in (states[key] if key else states).items() if torch.is_tensor(v)]
    assert len(saved) == (16 if layout == "pp2" else 32)  # pp2: each layer once, on its stage
    assert all(k.endswith((".lora_A", ".lora_B")) for k in saved)
    # The layout's adapters merged by the split plan (TP slices, ZeRO-3 partitions, pipeline
    # layers) are TP1's adapters (gate|up's B with stride 2).
    _, got = consolidated_weights(folder)
    _, tp1 = consolidated_weights(lora_runs["tp1"] / "checkpoints" / "step_00000006")
    assert got.keys() == tp1.keys()
    for name, full in tp1.items():  # a row order off (e.g. stride 1) would be off by ~100%
        assert _relative(got[name], full) < 1e-4, name
    assert tp1["blocks.1.mlp.gate_up.lora_B"].abs().max() > 1e-3


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "z3", "pp2"])
def test_export_merged_and_adapter_give_unmerged_logits(
    lora_runs: dict[str, Path],
    layout: str,
    tmp_path: Path,
    capsys,
    tensor_parallel: TensorParallel,
) -> None:
    from scaletrain.checkpoint.consolidate import consolidated_weights
    from scaletrain.cli import main
    from scaletrain.hf.export import find_checkpoint
    from scaletrain.hf.lora_export import with_base
    from scaletrain.models.gpt import GPT
    from scaletrain.models.lora import LoraSpec

    run, base = lora_runs[layout], lora_runs["base"]
    checkpoint = find_checkpoint(run)
    assert main(["export", "hf", str(run), str(tmp_path / "plain")]) == 2
    assert capsys.readouterr().err == (
        f"export: {checkpoint} holds LoRA adapters only; pass --merge-lora (the base with the "
        "adapters folded in) or --lora-adapter (a peft adapter folder)\n"
    )
    assert main(["export", "hf", str(run), str(tmp_path / "merged"), "--merge-lora"]) == 0
    assert main(["export", "hf", str(run), str(tmp_path / "adapter"), "--lora-adapter"]) == 0
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    # The unmerged scaletrain model: the base plus the run's adapters, at TP1.
    manifest, adapters = consolidated_weights(checkpoint)
    config = from_dict(manifest.data["config"])
    cfg = config.model
    weights = with_base(adapters, base, cfg)
    tp = TensorParallel(1, tensor_parallel.group, LoraSpec.of(config.finetune))
    model = GPT(cfg, weights["embedding.weight"].shape[0], tp).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(m.endswith("_extra_state") for m in missing)
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.logits(tokens)[..., : cfg.vocab_size]
    merged, peft, plain = exported_logits(tmp_path, base, tokens)
    assert _relative(merged, ours) < 1e-5
    assert _relative(peft, ours) < 1e-5
    assert _relative(plain, ours) > 1e-2  # the adapters do change the model


def exported_logits(
    folder: Path, base: Path, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' logits of `export hf`'s `folder/merged`, of `folder/adapter` loaded by peft
    over the HF folder `base`, and of that base alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(folder / "merged").eval()(tokens).logits
        hf_base = AutoModelForCausalLM.from_pretrained(base).eval()
        plain = hf_base(tokens).logits
        peft = PeftModel.from_pretrained(hf_base, folder / "adapter").eval()(tokens).logits
    return merged, peft, plain
