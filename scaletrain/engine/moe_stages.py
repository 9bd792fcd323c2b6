"""Pipeline stages without MoE blocks under DeepSpeed's ZeRO optimizer.

DeepSpeed's ZeRO optimizer reduces the gradient norm of each parameter group over the
model-parallel ranks (tp x pp, so across stages), one reduction per group. A stage that holds
MoE blocks has one group more per expert group (`split_params_into_different_moe_groups_for_
optimizer` appends them last); a stage without any (the embedding's, or every other block with
moe_layer_freq > 1) never makes those reductions, so the expert stages wait for it forever: the
kind of hang DeepSpeed #6714 reports. The pipeline's bf16 optimizer does the same once per
expert group name. Such a stage joins those reductions with a zero norm and adds what they
return (the experts' norm) to its own, as the expert stages do, so every stage clips by the
same global norm. fp16 at ZeRO-0 (DeepSpeed's FP16_Optimizer) builds its expert norms inside
its step, out of reach: that combination is refused in one line.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from scaletrain.errors import ScaletrainError


def expert_groups_here(engine: Any) -> int:
    """How many of the optimizer's parameter groups hold experts on this rank."""
    from deepspeed.moe.utils import is_moe_param_group

    groups = getattr(engine.optimizer, "optimizer", engine.optimizer).param_groups
    return sum(1 for group in groups if is_moe_param_group(group))


def join_expert_norm_reductions(
    engine: Any, pp_group: dist.ProcessGroup, ep: int, clips_itself: bool
) -> None:
    """Every rank, after deepspeed.initialize of a pipelined MoE model: make a stage without
    experts take part in the expert stages' norm reductions (see the module docstring)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    here = expert_groups_here(engine)
    counts = torch.tensor([here, -here], device=engine.device)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=pp_group)
    most, least = int(counts[0].item()), -int(counts[1].item())
    if most == least or clips_itself:  # scaletrain's own clipping reduces once per step
        return
    # Decided alike on every stage (the same optimizer type everywhere): all refuse or none.
    optimizer, missing = engine.optimizer, most - here
    zero = isinstance(optimizer, DeepSpeedZeroOptimizer) and not optimizer.cpu_offload
    if zero and missing:
        _pad_zero_norm(optimizer, missing)
    elif isinstance(optimizer, BF16_Optimizer) and missing:
        _pad_bf16_norm(optimizer, f"ep_size_{ep}", engine.device)
    elif not zero and not isinstance(optimizer, BF16_Optimizer):
        raise ScaletrainError(
            "parallel.pp: a pipeline stage without MoE blocks cannot join the expert "
            f"gradient-norm reductions of DeepSpeed's {type(optimizer).__name__}; use "
            "parallel.zero_stage=1, or a moe_layer_freq that gives every stage an MoE block"
        )


def _pad_zero_norm(optimizer: Any, missing: int) -> None:
    """ZeRO 1/2: one reduction per parameter group, the expert stages' groups last."""
    from deepspeed.runtime.utils import combine_grad_norm_groups

    own_norm = optimizer.scaled_global_norm

    def scaled_global_norm(norm_type: int = 2) -> torch.Tensor:
        norms = [own_norm(norm_type)]
        norms += [optimizer.get_grad_norm_direct([], [], norm_type) for _ in range(missing)]
        return combine_grad_norm_groups(norms, norm_type=norm_type)

    optimizer.scaled_global_norm = scaled_global_norm


def _pad_bf16_norm(optimizer: Any, expert_group: str, device: torch.device) -> None:
    """BF16 (the pipeline's bf16 optimizer): one reduction per expert group name, which it
    makes only when it has MoE layers; here over a zero gradient."""
    own_grads = optimizer.get_grads_for_norm

    def get_grads_for_norm(for_clipping: bool = False):
        grads = own_grads(for_clipping)
        if not for_clipping:
            grads[1].setdefault(expert_group, [torch.zeros(1, device=device)])
        return grads

    optimizer.get_grads_for_norm = get_grads_for_norm
    # The flag also makes it hand expert gradients to the engine's reduction: none here.
    optimizer.has_moe_layers = True
    optimizer.expert_gradients = {}
