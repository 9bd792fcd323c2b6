"""How every weight of a model family is split over TP ranks and what it is called in Hugging Face.

A family states its weights once, as a `SplitPlan` (see `scaletrain.models.llama` and
`scaletrain.models.mixtral`); everything that cuts, merges or renames weights reads it:
`ckpt consolidate` and resharding (`scaletrain.checkpoint`), the Hugging Face export and import
(`scaletrain.hf`). The kinds of split:

- replicated: every TP rank holds all of it (norm gains, the MoE router);
- column: output features (dim 0) cut into tp contiguous pieces;
- row: input features (dim 1) cut into tp pieces; the partial outputs are summed;
- vocab: the padded vocabulary rows (dim 0) cut like a column; HF has only the real rows;
- qkv: a column whose rows are grouped per key/value head, [q_1..q_g, k, v] per group, so a
  contiguous cut hands every rank whole groups; HF keeps q, k and v apart;
- gate_up: gate and up fused along dim 0 and cut with stride 2 (megatron-core's
  `partition_stride`): each rank holds its piece of the gate and its piece of up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from scaletrain.config.schema import ModelConfig
from scaletrain.errors import ScaletrainError


class Split(StrEnum):
    REPLICATED = "replicated"
    COLUMN = "column"
    ROW = "row"
    VOCAB = "vocab"
    QKV = "qkv"
    GATE_UP = "gate_up"

    @property
    def tp_dim(self) -> int | None:
        """megatron-core's `partition_dim` of this kind (None: not split)."""
        return {Split.REPLICATED: None, Split.ROW: 1}.get(self, 0)

    @property
    def tp_stride(self) -> int | None:
        """megatron-core's `partition_stride` of this kind (None: not split)."""
        return {Split.REPLICATED: None, Split.GATE_UP: 2}.get(self, 1)


@dataclass(frozen=True)
class Weight:
    """One weight (or a family of them, with `{layer}` / `{expert}` in the name)."""

    name: str
    """Our parameter name in the whole model (`GPT`), e.g. blocks.{layer}.attn.qkv.weight."""
    split: Split
    hf: tuple[str, ...]
    """Its Hugging Face name(s) in safetensors files: q/k/v for qkv, gate/up for gate_up."""
    pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex = re.escape(self.name).replace(r"\{layer\}", r"(?P<layer>\d+)")
        regex = regex.replace(r"\{expert\}", r"(?P<expert>\d+)")
        object.__setattr__(self, "pattern", re.compile(regex))

    def hf_names(self, **index: int) -> list[str]:
        return [name.format(**index) for name in self.hf]


@dataclass(frozen=True)
class SplitPlan:
    """Every weight of one model family."""

    weights: tuple[Weight, ...]

    def find(self, name: str) -> tuple[Weight, dict[str, int]]:
        """The plan entry of parameter `name` and its indices ({layer}, {expert})."""
        for weight in self.weights:
            match = weight.pattern.fullmatch(name)
            if match:
                return weight, {k: int(v) for k, v in match.groupdict().items()}
        raise ScaletrainError(f"{name}: no weight of that name in the model's split plan")

    def split_of(self, name: str) -> Split:
        return self.find(name)[0].split

    def expand(self, num_layers: int, num_experts: int) -> list[tuple[str, Weight, dict[str, int]]]:
        """Every weight of a model with these sizes: (our name, its entry, its indices)."""
        named = []
        for weight in self.weights:
            layers = range(num_layers) if "{layer}" in weight.name else [None]
            experts = range(num_experts) if "{expert}" in weight.name else [None]
            for layer in layers:
                for expert in experts:
                    pairs = (("layer", layer), ("expert", expert))
                    index = {k: v for k, v in pairs if v is not None}
                    named.append((weight.name.format(**index), weight, index))
        return named


def check_saved_split(plan: SplitPlan, name: str, tp_dim: int | None, stride: int | None) -> Split:
    """The plan's split of `name`, refused in one line if a checkpoint says otherwise."""
    try:
        split = plan.split_of(name)
    except ScaletrainError:
        raise ScaletrainError(
            f"{name}: saved split over TP along dim {tp_dim} with stride {stride}, and no "
            "weight of that name in the model's split plan"
        ) from None
    if (split.tp_dim, split.tp_stride) != (tp_dim, stride if tp_dim is not None else None):
        raise ScaletrainError(
            f"{name}: saved split over TP along dim {tp_dim} with stride {stride}, the model's "
            f"split plan says {split.value} (dim {split.tp_dim}, stride {split.tp_stride})"
        )
    return split


def merge_tp_slices(
    slices: list[torch.Tensor], tp_dim: int | None, tp_stride: int | None, name: str = "?"
) -> torch.Tensor:
    """The full fp32 tensor from the TP ranks' slices (in TP-rank order), as a new contiguous
    tensor. With stride s the full tensor is cut along tp_dim into tp * s chunks and TP rank r
    holds chunks r, r + tp, ... A replicated tensor (tp_dim None) is TP rank 0's copy."""
    from scaletrain.logs import get_logger

    if tp_dim is None:
        first = slices[0]
        if any(not torch.equal(first, other) for other in slices[1:]):
            get_logger(__name__).warning("%s differs between TP ranks; taking TP rank 0's", name)
        return first.to(torch.float32).clone(memory_format=torch.contiguous_format)
    stride = tp_stride or 1
    if any(s.shape[tp_dim] % stride for s in slices):
        raise ScaletrainError(f"{name}: a slice of dim {tp_dim} does not split into {stride}")
    parts = [s.chunk(stride, dim=tp_dim) for s in slices]
    # Rank r's k-th part is chunk k * tp + r of the full tensor.
    ordered = [rank_parts[k] for k in range(stride) for rank_parts in parts]
    return torch.cat(ordered, dim=tp_dim).to(torch.float32).contiguous()


def split_tp(
    full: torch.Tensor, tp: int, rank: int, tp_dim: int | None, tp_stride: int | None
) -> torch.Tensor:
    """TP rank `rank`'s slice of `full`: the inverse of `merge_tp_slices`."""
    if tp_dim is None:
        return full
    chunks = full.chunk(tp * (tp_stride or 1), dim=tp_dim)
    return torch.cat(chunks[rank::tp], dim=tp_dim)


def to_hf(split: Split, full: torch.Tensor, cfg: ModelConfig, names: int) -> list[torch.Tensor]:
    """Our full (TP-merged) tensor as its `names` Hugging Face tensors."""
    if split is Split.VOCAB:
        assert cfg.vocab_size is not None
        return [full[: cfg.vocab_size]]
    if split is Split.QKV and names == 3:
        g, d = cfg.num_heads // cfg.kv_heads, cfg.head_dim
        grouped = full.view(cfg.kv_heads, g + 2, d, full.shape[-1])
        q = grouped[:, :g].reshape(-1, full.shape[-1])
        return [
            q,
            grouped[:, g].reshape(-1, full.shape[-1]),
            grouped[:, g + 1].reshape(-1, full.shape[-1]),
        ]
    if split is Split.GATE_UP and names == 2:
        return list(full.chunk(2, dim=0))
    return [full]


def from_hf(
    split: Split, tensors: list[torch.Tensor], cfg: ModelConfig, padded_vocab_size: int
) -> torch.Tensor:
    """Our full tensor from its Hugging Face tensors (the inverse of `to_hf`); padded
    vocabulary rows are zero."""
    if split is Split.VOCAB:
        (rows,) = tensors
        full = rows.new_zeros(padded_vocab_size, rows.shape[1])
        full[: rows.shape[0]] = rows
        return full
    if split is Split.QKV and len(tensors) == 3:
        q, k, v = tensors
        g, d, hidden = cfg.num_heads // cfg.kv_heads, cfg.head_dim, q.shape[-1]
        groups = [
            q.view(cfg.kv_heads, g, d, hidden),
            k.view(cfg.kv_heads, 1, d, hidden),
            v.view(cfg.kv_heads, 1, d, hidden),
        ]
        return torch.cat(groups, dim=1).reshape(-1, hidden)
    if len(tensors) > 1:
        return torch.cat(tensors, dim=0)
    return tensors[0]
