"""LoRA on megatron-core's parallel linear layers: y = W x + alpha / r * B A dropout(x).

Our own adapter, not peft's `LoraParallelLinear`: with peft 0.21.2 and megatron-core 0.16,
`inject_adapter_in_model(LoraConfig(megatron_config=..., megatron_core="megatron.core"))`
stops in `dispatch_megatron` with `KeyError: 'fan_in_fan_out'`; beyond that, peft renames every
wrapped weight (`qkv.base_layer.weight`, which the split plan, checkpoints and HF import would
all have to learn), draws a row layer's A per TP slice (fan-in of the slice, so TP2 != TP1),
and gives B a stride of 1 where gate|up needs 2.

Here the layer keeps its name and gains two parameters, `lora_A` and `lora_B`. A is drawn
whole from the layer's seed and then split, B starts at zero, so a TP=N model holds exactly the
slices of the TP=1 model. Column layer: A replicated, the r-wide activation goes through
megatron's copy-to-TP region (backward sums A's gradient over the TP ranks), B split like W's
rows (stride included). Row layer: A split like W's columns, the partial r-wide activation is
summed over TP, B replicated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    set_tensor_model_parallel_attributes,
)
from torch import nn

from scaletrain.config.lora import LORA_TARGETS
from scaletrain.config.schema import FinetuneConfig
from scaletrain.models.lora_plan import trains_with_lora
from scaletrain.models.parallel import seeded_rng
from scaletrain.models.split_plan import split_tp


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @staticmethod
    def of(finetune: FinetuneConfig) -> LoraSpec | None:
        if finetune.lora_rank <= 0:
            return None
        return LoraSpec(
            finetune.lora_rank,
            finetune.lora_alpha,
            finetune.lora_dropout,
            tuple(finetune.lora_targets),
        )


def _full_a(spec: LoraSpec, in_features: int, target: str) -> torch.Tensor:
    """A [r, in] as peft / nn.Linear initialise it (Kaiming uniform, a=sqrt(5)), drawn under a
    seed of its own derived from the layer's: the base weights' RNG stream is left as without
    LoRA, and every TP degree draws the same whole matrix."""
    seed = torch.initial_seed() * 31 + LORA_TARGETS.index(target) + 1
    full = torch.empty(spec.rank, in_features)
    with seeded_rng(seed):
        nn.init.kaiming_uniform_(full, a=math.sqrt(5))
    return full


def _attach(
    layer: nn.Module,
    spec: LoraSpec,
    a: torch.Tensor,
    b: torch.Tensor,
    a_split: tuple[int, int] | None,
    b_split: tuple[int, int] | None,
) -> None:
    layer.lora_A = nn.Parameter(a.contiguous())
    layer.lora_B = nn.Parameter(b)
    for param, split in ((layer.lora_A, a_split), (layer.lora_B, b_split)):
        if split is not None:
            set_tensor_model_parallel_attributes(param, True, split[0], split[1])
    layer.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()
    layer.lora_scaling = spec.scaling


class LoraColumnParallelLinear(ColumnParallelLinear):
    """A column layer (output features split) with an adapter: A replicated, B split like W."""

    def __init__(
        self, *args, lora: LoraSpec, target: str, tp_size: int, tp_rank: int, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        a = _full_a(lora, self.input_size, target)
        b = torch.zeros(self.output_size_per_partition, lora.rank)
        _attach(self, lora, a, b, None, (0, self.weight.partition_stride))

    def forward(self, input_: torch.Tensor, weight=None, runtime_gather_output=None):
        out, bias = super().forward(input_, weight, runtime_gather_output)
        low = F.linear(self.lora_dropout(input_), self.lora_A)
        low = copy_to_tensor_model_parallel_region(low, group=self.tp_group)
        return out + self.lora_scaling * F.linear(low, self.lora_B), bias


class LoraRowParallelLinear(RowParallelLinear):
    """A row layer (input features split) with an adapter: A split like W, B replicated."""

    def __init__(
        self, *args, lora: LoraSpec, target: str, tp_size: int, tp_rank: int, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        a = split_tp(_full_a(lora, self.input_size, target), tp_size, tp_rank, 1, 1)
        b = torch.zeros(self.output_size, lora.rank)
        _attach(self, lora, a, b, (1, 1), None)

    def forward(self, input_: torch.Tensor):
        out, bias = super().forward(input_)
        low = F.linear(self.lora_dropout(input_), self.lora_A)
        low = reduce_from_tensor_model_parallel_region(low, group=self.tp_group)
        return out + self.lora_scaling * F.linear(low, self.lora_B), bias


def freeze_base(model: nn.Module) -> tuple[int, int]:
    """Only the adapters (and a classifier's score head) train: every other parameter stops
    taking gradients (and so gets no optimizer state, see engine.deepspeed.param_groups).
    Returns (trainable, frozen) counts of whole parameters (ZeRO-3's `ds_numel`: its
    partitioned ones hold an empty placeholder)."""
    trainable = frozen = 0
    for name, param in model.named_parameters():
        param.requires_grad_(trains_with_lora(name))
        count = getattr(param, "ds_numel", param.numel())
        if param.requires_grad:
            trainable += count
        else:
            frozen += count
    return trainable, frozen


def held_base(model: nn.Module) -> int | None:
    """Elements of the frozen base this rank holds under ZeRO-3 (its partitions, `ds_tensor`),
    None when nothing is partitioned."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    if not any(hasattr(p, "ds_tensor") for p in frozen):
        return None
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in frozen)
