"""The model families: the trainer asks for "the model of this config", never names a class.

A family is a module with its split plan and its Hugging Face config mapping plus an entry
here. Both families run on `scaletrain.models.gpt` (the layer list decides dense or MoE blocks);
`llama` is the dense decoder, `mixtral` the one with MoE blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from scaletrain.config.schema import ModelConfig
from scaletrain.errors import ScaletrainError
from scaletrain.models import llama, mixtral
from scaletrain.models.split_plan import SplitPlan

if TYPE_CHECKING:  # the checkpoint tools read split plans without importing megatron-core
    from torch import nn

    from scaletrain.models.classifier import ClassifySpec
    from scaletrain.models.moe import ExpertParallel
    from scaletrain.models.parallel import TensorParallel
    from scaletrain.topology.dims import ParallelDims


@dataclass(frozen=True)
class Family:
    name: str
    split_plan: Callable[[ModelConfig], SplitPlan]
    hf_architecture: str
    hf_config: Callable[[ModelConfig], dict[str, Any]]
    model_fields: Callable[[dict[str, Any], str], dict[str, Any]]
    """Our model fields from an HF config.json (refusing what we cannot express)."""
    exportable: Callable[[ModelConfig, str], None]


def _always(cfg: ModelConfig, where: str) -> None:
    return None


def _family(module: ModuleType, exportable: Callable[[ModelConfig, str], None]) -> Family:
    return Family(
        module.HF_MODEL_TYPE,
        module.split_plan,
        module.HF_ARCHITECTURE,
        module.hf_config,
        module.model_fields,
        exportable,
    )


FAMILIES = {
    "llama": _family(llama, _always),
    "mixtral": _family(mixtral, mixtral.exportable),
}


def family_of(cfg: ModelConfig) -> Family:
    """`mixtral` for a model with experts, `llama` for a dense one."""
    return FAMILIES["mixtral" if cfg.num_experts else "llama"]


def family_of_hf(architecture: str, where: str) -> Family:
    """The family whose HF architecture is `architecture`, or a one-line refusal."""
    for family in FAMILIES.values():
        if family.hf_architecture == architecture:
            return family
    known = ", ".join(f.hf_architecture for f in FAMILIES.values())
    raise ScaletrainError(f"{where}: architecture {architecture} is not supported ({known})")


def build_model(
    cfg: ModelConfig,
    padded_vocab_size: int,
    tp: TensorParallel,
    dims: ParallelDims,
    ep: ExpertParallel,
    partition: str,
    classify: ClassifySpec | None = None,
) -> nn.Module:
    """The whole model, or this rank's pipeline stage of it when pp > 1 (same weights);
    with `classify` the sequence classifier (`train.task: classify`, no pipeline stages)."""
    if classify is not None:
        from scaletrain.models.classifier import Classifier

        return Classifier(cfg, padded_vocab_size, tp, classify, ep)
    if dims.pp > 1:
        from scaletrain.models.pipeline import pipeline_model

        return pipeline_model(cfg, padded_vocab_size, tp, dims, partition, ep)
    from scaletrain.models.gpt import GPT

    return GPT(cfg, padded_vocab_size, tp, ep)


def pipeline_layer_names(cfg: ModelConfig) -> list[str]:
    """The names of `scaletrain.models.gpt.model_layers` in order: a pipeline's layer index ->
    the whole model's name (light: the checkpoint tools read it without building a model)."""
    return ["embedding", *(f"blocks.{i}" for i in range(cfg.num_layers)), "norm", "head"]


def saved_model_config(config: dict[str, Any]) -> ModelConfig:
    """The `ModelConfig` a checkpoint's manifest (or a run's config.yaml) recorded."""
    known = set(ModelConfig.__dataclass_fields__)
    return ModelConfig(**{k: v for k, v in (config.get("model") or {}).items() if k in known})


def saved_split_plan(manifest: dict[str, Any]) -> SplitPlan:
    """The split plan of the model a checkpoint's manifest describes (its LoRA adapters and a
    classifier's score weight too)."""
    from scaletrain.models.classify_plan import is_classifier, with_score
    from scaletrain.models.lora_plan import with_lora

    config = manifest.get("config") or {}
    cfg = saved_model_config(config)
    plan = family_of(cfg).split_plan(cfg)
    plan = with_score(plan) if is_classifier(config) else plan
    return with_lora(plan, config.get("finetune"))
