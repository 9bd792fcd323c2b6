"""Training FLOPs per token, the numerator of MFU.

Counts the matrix multiplies of forward and backward (3x forward, as in the PaLM and Megatron
papers), including attention scores and the vocabulary head; norms and activations are ignored.
Causal masking is not discounted, matching the usual MFU convention. An MoE token runs
through top_k experts and the moe_shared_experts always-active ones only, so MFU counts
active parameters, not all experts.
"""

from __future__ import annotations

from scaletrain.config.schema import ModelConfig


def moe_layer_count(cfg: ModelConfig) -> int:
    """Decoder blocks whose MLP is a mixture of experts (blocks 0, n, 2n, ...)."""
    return len(range(0, cfg.num_layers, cfg.moe_layer_freq)) if cfg.num_experts else 0


def _block_matmul_params(cfg: ModelConfig, active: bool) -> int:
    """Matmul weights of all decoder blocks; `active`: only the experts a token is routed to."""
    qkv = cfg.hidden_size * (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim
    out = cfg.num_heads * cfg.head_dim * cfg.hidden_size
    mlp = 3 * cfg.hidden_size * cfg.ffn_size
    moe = moe_layer_count(cfg)
    experts = (cfg.moe_top_k if active else cfg.num_experts) + cfg.moe_shared_experts
    router = cfg.hidden_size * cfg.num_experts
    return (
        cfg.num_layers * (qkv + out) + (cfg.num_layers - moe) * mlp + moe * (experts * mlp + router)
    )


def matmul_params(cfg: ModelConfig, padded_vocab_size: int) -> int:
    """Weights that take part in a matmul per token (the input embedding is a lookup); for MoE
    only the top-k experts a token is routed to (and the router)."""
    return _block_matmul_params(cfg, active=True) + cfg.hidden_size * padded_vocab_size


def parameter_count(cfg: ModelConfig, padded_vocab_size: int, active: bool = False) -> int:
    """All weights of the model (embedding, blocks, norms, and the head unless tied); with
    `active`, an MoE model's experts count only top_k per MoE layer (Mixtral's "active
    parameters")."""
    embedding = padded_vocab_size * cfg.hidden_size
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
    head = 0 if cfg.tie_embeddings else embedding
    return _block_matmul_params(cfg, active) + embedding + head + norms


def flops_per_token(cfg: ModelConfig, seq_len: int, padded_vocab_size: int) -> float:
    """Forward + backward FLOPs for one token of a `seq_len` sequence."""
    dense = 2 * matmul_params(cfg, padded_vocab_size)
    attention = 2 * 2 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
    return 3.0 * (dense + attention)
