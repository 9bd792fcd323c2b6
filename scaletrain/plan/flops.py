"""Training FLOPs per token, the numerator of MFU.

Counts the matrix multiplies of forward and backward (3x forward, as in the PaLM and Megatron
papers), including attention scores and the vocabulary head; norms and activations are ignored.
Causal masking is not discounted, matching the usual MFU convention.
"""

from __future__ import annotations

from scaletrain.config.schema import ModelConfig


def matmul_params(cfg: ModelConfig, padded_vocab_size: int) -> int:
    """Weights that take part in a matmul per token (the input embedding is a lookup)."""
    qkv = cfg.hidden_size * (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim
    out = cfg.num_heads * cfg.head_dim * cfg.hidden_size
    mlp = 3 * cfg.hidden_size * cfg.ffn_size
    return cfg.num_layers * (qkv + out + mlp) + cfg.hidden_size * padded_vocab_size


def parameter_count(cfg: ModelConfig, padded_vocab_size: int) -> int:
    """All weights of the model (embedding, blocks, norms, and the head unless tied)."""
    embedding = padded_vocab_size * cfg.hidden_size
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
    head = 0 if cfg.tie_embeddings else embedding
    return (
        matmul_params(cfg, padded_vocab_size)
        - cfg.hidden_size * padded_vocab_size
        + (embedding + head + norms)
    )


def flops_per_token(cfg: ModelConfig, seq_len: int, padded_vocab_size: int) -> float:
    """Forward + backward FLOPs for one token of a `seq_len` sequence."""
    dense = 2 * matmul_params(cfg, padded_vocab_size)
    attention = 2 * 2 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
    return 3.0 * (dense + attention)
