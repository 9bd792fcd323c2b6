"""The small model the single-process model tests build: 2 blocks of width 32, 4 query / 2 KV
heads, a vocabulary of 100 padded to 128 (`PADDED`); `derive` makes its variants."""

from __future__ import annotations

from typing import Any

from scaletrain.config.schema import ModelConfig

DENSE = ModelConfig(
    vocab_size=100,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    ffn_hidden_size=48,
    max_seq_len=16,
    make_vocab_size_divisible_by=64,
)
PADDED = 128


def derive(cfg: ModelConfig = DENSE, **changes: Any) -> ModelConfig:
    """`cfg` with `changes`, checked again as a new ModelConfig."""
    return ModelConfig(**{**cfg.__dict__, **changes})
