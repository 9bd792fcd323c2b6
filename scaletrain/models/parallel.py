"""How the model is split over tensor-parallel ranks: the only file that builds megatron layers.

Model code asks for a `column` layer (output features split over TP ranks), a `row` layer
(input features split, outputs summed) or the vocab-parallel embedding and loss. Weights are
always made whole on the CPU from the global seed and then split (`use_cpu_initialization`),
so a TP=N model holds exactly the slices of the TP=1 model.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from torch import nn
from torch.distributed import ProcessGroup

if TYPE_CHECKING:
    from scaletrain.models.lora import LoraSpec


def normal_init(std: float) -> Callable[[torch.Tensor], None]:
    def init(tensor: torch.Tensor) -> None:
        torch.nn.init.normal_(tensor, mean=0.0, std=std)

    return init


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Build under the global RNG seeded with `seed`, then restore the RNG as it was: a
    layer's (or expert's) weights then depend on its seed only, not on what was built before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed % 2**63)
        yield


class TensorParallel:
    """Factory of megatron-core parallel layers for one TP group."""

    def __init__(self, size: int, group: ProcessGroup | None, lora: LoraSpec | None = None) -> None:
        self.size = size
        self.group = group
        self.lora = lora
        """LoRA adapters (finetune.lora_*) on the layers built with one of its targets."""
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=size,
            use_cpu_initialization=True,
            perform_initialization=True,
            params_dtype=torch.float32,
            sequence_parallel=False,
            gradient_accumulation_fusion=False,
        )

    def column(
        self,
        in_features: int,
        out_features: int,
        std: float,
        stride: int = 1,
        lora_target: str | None = None,
    ) -> ColumnParallelLinear:
        """Output features split over TP; `stride` keeps fused blocks (e.g. gate|up) per rank.
        `lora_target` names the layer for finetune.lora_targets (qkv, gate_up)."""
        return self._adapted(ColumnParallelLinear, lora_target)(
            in_features,
            out_features,
            config=self.config,
            init_method=normal_init(std),
            bias=False,
            gather_output=False,
            stride=stride,
            tp_group=self.group,
        )

    def tied_column(self, in_features: int, out_features: int) -> ColumnParallelLinear:
        """A column layer without its own weight: it is given the embedding's at call time."""
        return ColumnParallelLinear(
            in_features,
            out_features,
            config=self.config,
            init_method=normal_init(0.0),
            bias=False,
            gather_output=False,
            skip_weight_param_allocation=True,
            tp_group=self.group,
        )

    def row(
        self, in_features: int, out_features: int, std: float, lora_target: str | None = None
    ) -> RowParallelLinear:
        """Input features split over TP; the partial outputs are summed over the group.
        `lora_target` names the layer for finetune.lora_targets (out, down)."""
        return self._adapted(RowParallelLinear, lora_target)(
            in_features,
            out_features,
            config=self.config,
            init_method=normal_init(std),
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=self.group,
        )

    def _adapted(self, layer: type, target: str | None) -> Callable[..., nn.Module]:
        """`layer`, or its LoRA subclass when the run puts an adapter on `target`."""
        if self.lora is None or target not in self.lora.targets:
            return layer
        from scaletrain.models.lora import LoraColumnParallelLinear, LoraRowParallelLinear

        adapted = LoraRowParallelLinear if layer is RowParallelLinear else LoraColumnParallelLinear
        rank = dist.get_rank(group=self.group) if self.size > 1 else 0
        return functools.partial(
            adapted, lora=self.lora, target=target, tp_size=self.size, tp_rank=rank
        )

    def embedding(self, vocab_size: int, hidden_size: int, std: float) -> VocabParallelEmbedding:
        """Vocabulary rows split over TP; lookups are summed over the group."""
        return VocabParallelEmbedding(
            vocab_size,
            hidden_size,
            init_method=normal_init(std),
            config=self.config,
            tp_group=self.group,
        )

    @staticmethod
    def cross_entropy(local_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token loss from logits whose vocabulary is split over TP (computed in fp32)."""
        return vocab_parallel_cross_entropy(local_logits.float(), labels)


def scaled_std(std: float, num_layers: int) -> float:
    """Residual-branch output projections start smaller so the stream's variance stays flat."""
    return std / math.sqrt(2.0 * num_layers)
