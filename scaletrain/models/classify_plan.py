"""`train.task: classify` in the split plan: the vocabulary head is gone, a `score` weight is there.

As transformers' `LlamaForSequenceClassification` has no `lm_head`, the classifier keeps the
decoder and replaces the head by `score` ([num_labels, hidden], no bias), replicated over TP
(it is tiny; every TP rank computes the same gradient for it). Light on purpose (no
megatron-core): the checkpoint tools and the export read it.
"""

from __future__ import annotations

from typing import Any

from scaletrain.models.split_plan import Split, SplitPlan, Weight

TASK = "classify"
SCORE_WEIGHT = "score.weight"
HF_ARCHITECTURE = "LlamaForSequenceClassification"
_LM_HEAD = "head.proj.weight"


def is_classifier(config: dict[str, Any]) -> bool:
    """Whether a run's config (as a manifest or config.yaml records it) trains a classifier."""
    return (config.get("train") or {}).get("task") == TASK


def decoder_only(weights: dict[str, Any]) -> dict[str, Any]:
    """A language model's weights without the vocabulary head: a LoRA classifier's base."""
    return {name: tensor for name, tensor in weights.items() if name != _LM_HEAD}


def with_score(plan: SplitPlan) -> SplitPlan:
    """`plan` without the vocabulary head and with the score weight."""
    kept = tuple(w for w in plan.weights if w.name != _LM_HEAD)
    return SplitPlan((*kept, Weight(SCORE_WEIGHT, Split.REPLICATED, (SCORE_WEIGHT,))))
