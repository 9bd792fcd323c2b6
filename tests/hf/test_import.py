"""`model.init_from: hf:<folder>`: a run starts from a Hugging Face Llama or Mixtral folder made
here with transformers' own classes and `save_pretrained` (no hub). Its step-1 loss (the loss
of the imported weights, before any update) equals the loss transformers computes on the same
batch within 1e-5 relative, at TP1, TP2, PP2 and DP2 ZeRO-3; what cannot be imported is one
line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from scaletrain.config.checks import check_config
from scaletrain.config.load import load_config
from scaletrain.data import GlobalBatchSampler, build_dataset
from scaletrain.errors import ScaletrainError
from scaletrain.hf.imports import apply_init_from, full_weights, read_hf_weights
from scaletrain.models.parallel import TensorParallel
from tests.distributed import TINY, read_metrics, torchrun
from tests.hf.conftest import relative_error, scaletrain_logits

# The tiny model's sizes; rope_theta and rms_norm_eps differ from our defaults, so the run
# takes them from config.json.
SIZES = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=500000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def save_llama(folder: Path, seed: int = 0, **changes) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**{**SIZES, **changes})).save_pretrained(folder)
    return folder


def save_mixtral(folder: Path) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(1)
    sizes = {k: v for k, v in SIZES.items() if k != "rope_theta"}
    MixtralForCausalLM(MixtralConfig(**sizes, num_local_experts=4)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("hf") / "llama")


def tiny_config(data: Path, folder: Path, *overrides: str):
    args = [f"data.paths=[{data}]", f"model.init_from=hf:{folder}", *overrides]
    return load_config(TINY, args)


@pytest.mark.parametrize("save", [save_llama, save_mixtral])
def test_imported_weights_give_transformers_logits(
    save, tmp_path: Path, stdlib_data: Path, tensor_parallel: TensorParallel
) -> None:
    from transformers import AutoModelForCausalLM

    folder = save(tmp_path / "hf")
    moe = () if save is save_llama else ("model.moe_capacity_factor=2.0",)
    config = tiny_config(stdlib_data, folder, *moe)
    resolved = check_config(config, world_size=1)
    assert (config.model.rope_theta, config.model.norm_eps) == (
        (500000.0, 1e-6) if save is save_llama else (1e6, 1e-6)
    )
    assert config.model.num_experts == (0 if save is save_llama else 4)
    weights = full_weights(read_hf_weights(folder), config.model, resolved.padded_vocab_size, "x")
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = scaletrain_logits(weights, config.model, tensor_parallel, tokens)
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(folder).eval()(tokens).logits
    assert relative_error(ours, theirs) < 1e-5


def test_what_cannot_be_imported_is_one_line(
    llama: Path, tmp_path: Path, stdlib_data: Path
) -> None:
    config = load_config(TINY, [f"data.paths=[{stdlib_data}]", "model.init_from=llama"])
    with pytest.raises(ScaletrainError) as err:
        apply_init_from(config)
    assert str(err.value) == "config error: model.init_from: ('llama') must be hf:<local folder>"
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    with pytest.raises(ScaletrainError) as err:
        apply_init_from(tiny_config(stdlib_data, gpt2))
    assert str(err.value) == (
        f"config error: model.init_from: ('hf:{gpt2}'): {gpt2} has no config.json"
    )
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ScaletrainError) as err:
        apply_init_from(tiny_config(stdlib_data, gpt2))
    assert str(err.value) == (
        f"{gpt2}: architecture GPT2LMHeadModel is not supported "
        "(LlamaForCausalLM, MixtralForCausalLM)"
    )
    with pytest.raises(ScaletrainError) as err:  # the run's config sets another width
        apply_init_from(tiny_config(stdlib_data, save_llama(tmp_path / "wide", hidden_size=128)))
    assert str(err.value) == (
        f"config error: model.hidden_size: (64) differs from 128 in {tmp_path / 'wide'}/"
        "config.json; remove it or set 128"
    )
    # Mismatched shapes: config.json says 2 kv heads, the weights hold 4.
    broken = save_llama(tmp_path / "broken")
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    config = tiny_config(stdlib_data, broken)
    check_config(config, world_size=1)
    with pytest.raises(ScaletrainError) as err:
        full_weights(read_hf_weights(broken), config.model, 512, str(broken))
    assert str(err.value).startswith(
        f"{broken}: model.layers.1.self_attn.q_proj.weight, "
        "model.layers.1.self_attn.k_proj.weight, model.layers.1.self_attn.v_proj.weight of "
        "shape [[64, 64], [64, 64], [32, 64]] does not fit the model of its config.json"
    )
    assert "\n" not in str(err.value)
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    with pytest.raises(ScaletrainError, match=r"no \.safetensors weights \(found: pytorch_model"):
        read_hf_weights(broken)


def transformers_loss(folder: Path, data: Path) -> float:
    """transformers' mean next-token loss on the run's first global batch."""
    from transformers import AutoModelForCausalLM

    config = load_config(TINY, [f"data.paths=[{data}]"])
    dataset = build_dataset(
        config.data.paths, config.data.weights, "train", config.train.seq_len, config.train.seed
    )
    sampler = GlobalBatchSampler(
        len(dataset), config.train.global_batch, 0, 1, config.train.seed, config.data.shuffle
    )
    windows = torch.from_numpy(np.stack([dataset[int(i)] for i in sampler.next_batch()])).long()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(windows[:, :-1]).logits
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)
    ).item()


LAYOUTS = {
    "tp1": (1, ()),
    "tp2": (2, ("parallel.tp=2",)),
    "pp2": (2, ("parallel.pp=2",)),
    "dp2-zero3": (2, ("parallel.zero_stage=3",)),  # partitioned parameters, gathered to load
    # HF Mixtral drops no token (moe_drop_tokens: false): the router pads the slots to tp
    "mixtral-tp2": (2, ("parallel.tp=2",)),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_step_zero_loss_equals_transformers(
    layout: str, llama: Path, stdlib_data: Path, tmp_path: Path
) -> None:
    ranks, overrides = LAYOUTS[layout]
    folder = save_mixtral(tmp_path / "mixtral") if layout.startswith("mixtral") else llama
    args = ("--config", str(TINY), f"data.paths=[{stdlib_data}]", f"train.run_dir={tmp_path}")
    args = (*args, f"model.init_from=hf:{folder}", "train.steps=2", "train.eval_interval=0")
    args = (*args, "checkpoint.interval=0", *overrides)
    # torchrun even for one rank: a plain process would inherit this test process's
    # MASTER_PORT (its world of one listens there).
    torchrun(ranks, "-m", "scaletrain", "train", *args)
    losses = [m["loss"] for m in read_metrics(tmp_path)]
    want = transformers_loss(folder, stdlib_data)
    assert abs(losses[0] - want) / want < 1e-5
    assert losses[1] != losses[0]  # then it trains as usual


def test_data_prepare_tokenizes_with_the_hf_folders_tokenizer(
    llama: Path, stdlib_data: Path, tmp_path: Path
) -> None:
    """`data prepare --tokenizer <HF folder>` reads the tokenizer transformers saved there:
    the same token shards as the tokenizer it was made from."""
    import shutil

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from scaletrain.data import prepare_dataset, stdlib_sources

    folder = tmp_path / "with-tokenizer"
    shutil.copytree(llama, folder)
    backend = Tokenizer.from_file(str(stdlib_data / "tokenizer" / "tokenizer.json"))
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(
        folder
    )
    out = tmp_path / "data"
    prepare_dataset(stdlib_sources()[:40], out, tokenizer=folder, val_fraction=0.1, num_proc=1)
    shards = sorted(p.relative_to(stdlib_data) for p in stdlib_data.rglob("*.bin"))
    assert shards
    assert all((out / p).read_bytes() == (stdlib_data / p).read_bytes() for p in shards)
