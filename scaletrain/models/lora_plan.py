"""How LoRA adapters are split over TP and named in peft, derived from the family's split plan.

An adapter on a column layer (qkv, gate_up) has a replicated A [r, in] and a B [out, r] split
exactly like the base weight's rows (qkv grouped per kv head, gate|up with stride 2); on a row
layer (out, down) A [r, in] is split like the base's columns and B is replicated (as peft and
Megatron do). Nothing here restates a split: each adapter entry is read off its base weight's.
Light on purpose (no megatron-core): the checkpoint tools and the export read it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from scaletrain.models.classify_plan import SCORE_WEIGHT
from scaletrain.models.split_plan import Split, SplitPlan, Weight

LORA_A, LORA_B = "lora_A", "lora_B"
TARGET_WEIGHTS = {
    "qkv": "blocks.{layer}.attn.qkv.weight",
    "out": "blocks.{layer}.attn.out.weight",
    "gate_up": "blocks.{layer}.mlp.gate_up.weight",
    "down": "blocks.{layer}.mlp.down.weight",
}
"""finetune.lora_targets -> the base weight the adapter sits on."""


def is_lora_name(name: str) -> bool:
    return name.endswith((f".{LORA_A}", f".{LORA_B}"))


def trains_with_lora(name: str) -> bool:
    """What a LoRA run trains and checkpoints: the adapters, and a classifier's new `score`
    head in full (peft's `modules_to_save=["score"]`: it has no pretrained weights to adapt)."""
    return is_lora_name(name) or name == SCORE_WEIGHT


def adapter_name(base: str, which: str) -> str:
    """blocks.0.attn.qkv.weight -> blocks.0.attn.qkv.lora_A (a parameter of the same layer)."""
    return f"{base.removesuffix('.weight')}.{which}"


def _peft_name(hf: str, which: str) -> str:
    return f"{hf.removesuffix('.weight')}.{which}.weight"


def adapter_splits(split: Split) -> tuple[Split, Split]:
    """(split of A, split of B) of an adapter on a base weight split as `split`."""
    if split is Split.ROW:
        return Split.ROW, Split.REPLICATED
    return Split.REPLICATED, split


def lora_weights(plan: SplitPlan, targets: Iterable[str]) -> list[Weight]:
    """The adapters' entries: A and B of every target, with peft's names as their HF names."""
    entries = []
    for target in targets:
        base = next(w for w in plan.weights if w.name == TARGET_WEIGHTS[target])
        split_a, split_b = adapter_splits(base.split)
        for which, split in ((LORA_A, split_a), (LORA_B, split_b)):
            hf = tuple(_peft_name(h, which) for h in base.hf)
            entries.append(Weight(adapter_name(base.name, which), split, hf))
    return entries


def with_lora(plan: SplitPlan, finetune: dict[str, Any] | None) -> SplitPlan:
    """`plan` plus the adapters a run's `finetune` section (a manifest's config) asks for."""
    if not finetune or not finetune.get("lora_rank"):
        return plan
    return SplitPlan(plan.weights + tuple(lora_weights(plan, finetune["lora_targets"])))


def scaling(finetune: dict[str, Any]) -> float:
    return float(finetune["lora_alpha"]) / int(finetune["lora_rank"])


def merge_adapters(
    weights: dict[str, torch.Tensor], finetune: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Full base weights with every adapter folded in (W + alpha / r * B A), adapters dropped."""
    merged = {k: v for k, v in weights.items() if not is_lora_name(k)}
    scale = scaling(finetune)
    for name in [k for k in weights if k.endswith(f".{LORA_A}")]:
        base = name.removesuffix(f".{LORA_A}") + ".weight"
        delta = weights[adapter_name(base, LORA_B)].double() @ weights[name].double()
        merged[base] = (merged[base].double() + scale * delta).to(merged[base].dtype)
    return merged
