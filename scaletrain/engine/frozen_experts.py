"""DeepSpeed's engine over an MoE model whose experts are all frozen (LoRA on the attention).

DeepSpeed keys its MoE handling on `isinstance(module, MoE)` (`engine.has_moe_layers`), and all
of it serves trainable experts: ZeRO 1/2 assert that some optimizer group is an MoE group
("The model has moe layers, but None of the param groups are marked as MoE"; the engine drops
a group with no parameter, so an empty one cannot stand in), expert gradients are reduced over
the expert-data-parallel ranks, and `save_checkpoint` writes every expert to a file of its own
whatever `exclude_frozen_parameters` says, which `load_checkpoint` then requires. With no
trainable expert there is nothing of that to do, so the engine is built blind to the MoE layers:
its optimizer sees the adapters as the dense parameters they are (reduced over all
data-parallel ranks), and a checkpoint holds the trainable parameters only.

The MoE layers themselves are untouched: every module's `set_deepspeed_parallelism` still
gives them their expert-parallel groups, and routing, the all-to-all and the router losses run
as in any run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def frozen_experts(model: nn.Module) -> bool:
    """The model has DeepSpeed MoE layers and none of their experts trains."""
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.utils import is_moe_param

    layers = [m for m in model.modules() if isinstance(m, MoE)]
    experts = [p for layer in layers for p in layer.parameters() if is_moe_param(p)]
    return bool(layers) and not any(p.requires_grad for p in experts)


class _NotAnMoELayer:
    """What the engine's MoE check compares against while it is built: no module is one."""


@contextlib.contextmanager
def engine_without_moe(model: nn.Module) -> Iterator[None]:
    """Inside: `deepspeed.initialize` of `model` treats it as dense if its experts are all
    frozen (`frozen_experts`); otherwise nothing changes."""
    import deepspeed.runtime.engine as engine_module

    if not frozen_experts(model):
        yield
        return
    saved = engine_module.MoE
    engine_module.MoE = _NotAnMoELayer
    try:
        yield
    finally:
        engine_module.MoE = saved
