"""The rules of a Mixture-of-Experts config: what DeepSpeed's native MoE layer and its gates
accept with the layout, and the expert capacity they compute (the planner uses it too)."""

from __future__ import annotations

import numpy as np

from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError, require_positive
from scaletrain.topology.dims import ParallelDims

MAX_TOP_K = 8
"""DeepSeek-V3's top-8; DeepSpeed's top-k gate and ours take any k."""


def check_moe(config: Config, dims: ParallelDims) -> None:
    m, p = config.model, config.parallel
    if m.num_experts < 0:
        raise ConfigError("model.num_experts", f"must be >= 0 (0 = dense), got {m.num_experts}")
    if m.num_experts == 0:
        if dims.ep > 1:
            raise ConfigError(
                "parallel.ep",
                f"({dims.ep}) splits experts, but the model is dense; set model.num_experts "
                "or ep=1",
            )
        return
    if not 1 <= m.moe_top_k <= MAX_TOP_K:
        raise ConfigError("model.moe_top_k", f"must be 1 to {MAX_TOP_K}, got {m.moe_top_k}")
    if m.moe_top_k > m.num_experts:
        raise ConfigError(
            "model.moe_top_k",
            f"({m.moe_top_k}) exceeds model.num_experts ({m.num_experts})",
        )
    require_positive(m.moe_capacity_factor, "model.moe_capacity_factor")
    require_positive(m.moe_eval_capacity_factor, "model.moe_eval_capacity_factor")
    require_positive(m.moe_layer_freq, "model.moe_layer_freq")
    names = ("moe_min_capacity", "moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_shared_experts")
    for name in (*names, "moe_router_bias_update_rate"):
        if getattr(m, name) < 0:
            raise ConfigError(f"model.{name}", f"must be >= 0, got {getattr(m, name)}")
    if m.num_experts % dims.ep:
        raise ConfigError(
            "model.num_experts",
            f"({m.num_experts}) must be divisible by parallel.ep ({dims.ep})",
        )
    if p.zero_stage == 3:
        raise ConfigError(
            "parallel.zero_stage",
            "(3) is refused by DeepSpeed's native MoE layer (it cannot partition expert "
            "parameters over the expert-data-parallel group) and DeepSpeed's AutoEP accepts "
            "only Hugging Face models without megatron-core TP; use zero_stage 1 or 2",
        )
    tokens = config.train.micro_batch * config.train.seq_len
    if m.moe_top_k == 1 and m.moe_min_capacity > tokens:
        raise ConfigError(
            "model.moe_min_capacity",
            f"({m.moe_min_capacity}) exceeds the tokens of a micro-batch ({tokens}, "
            "micro_batch * seq_len), which DeepSpeed's top-1 gate refuses; lower it",
        )
    if dims.tp == 1 or not m.moe_drop_tokens:  # no-drop: the router pads slots to tp
        return
    for name in ("moe_capacity_factor", "moe_eval_capacity_factor"):
        slots = expert_capacity(
            tokens, m.num_experts, getattr(m, name), m.moe_top_k, m.moe_min_capacity
        )
        if slots % dims.tp:
            raise ConfigError(
                f"model.{name}",
                f"gives an expert capacity of {slots} tokens per micro-batch, which DeepSpeed "
                f"must split evenly over parallel.tp ({dims.tp}); change it, moe_min_capacity "
                "or micro_batch * seq_len",
            )


def expert_capacity(tokens: int, experts: int, factor: float, top_k: int, minimum: int) -> int:
    """Token slots per expert per micro-batch in drop mode, computed as DeepSpeed's gate does
    (`ceil(tokens / experts * factor * top_k)` in float32, at least `minimum`)."""
    slots = np.ceil(np.float32(tokens / experts) * np.float32(factor * top_k))
    return max(int(slots), minimum)
