"""The HF folder writer on models built here (no checkpoint, one process): tied embeddings,
Mixtral experts and safetensors shards with their index load in transformers with our logits,
and the vocabulary is trimmed from the padded size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scaletrain.config.schema import ModelConfig
from scaletrain.hf.export import write_hf_folder
from scaletrain.models.gpt import GPT
from scaletrain.models.parallel import TensorParallel
from scaletrain.topology.init import seed_everything
from tests.hf.conftest import relative_error, scaletrain_logits

BASE = dict(
    vocab_size=100,  # padded to 128: export trims 28 rows
    make_vocab_size_divisible_by=64,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    ffn_hidden_size=48,
    max_seq_len=64,
    rope_theta=50000.0,
)
CASES = {
    "llama-tied": ModelConfig(**BASE, tie_embeddings=True),
    "mixtral": ModelConfig(**BASE, num_experts=4, moe_capacity_factor=2.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_written_folder_gives_our_logits(
    case: str, tmp_path: Path, tensor_parallel: TensorParallel
) -> None:
    from transformers import AutoModelForCausalLM

    cfg = CASES[case]
    seed_everything(5)
    model = GPT(cfg, 128, tensor_parallel)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = tmp_path / "hf"
    count = write_hf_folder(weights, cfg, out, max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).stat().st_size < 40_000 for s in shards)
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert hf.model.embed_tokens.weight.shape == (100, 32)
    assert count == sum(p.numel() for p in model.parameters()) - 28 * 32 * (2 - cfg.tie_embeddings)
    assert hf.config.tie_word_embeddings is cfg.tie_embeddings
    if cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    tokens = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(tokens).logits
    assert relative_error(theirs, scaletrain_logits(weights, cfg, tensor_parallel, tokens)) < 1e-5
