"""The model a run trains: its family's model (or this rank's pipeline stage of it), the Hugging
Face weights of `model.init_from` when they are not about to come from a checkpoint, and LoRA's
frozen base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from scaletrain.checkpoint.lora_base import CHECKPOINT, load_checkpoint_base
from scaletrain.config.checks import Resolved
from scaletrain.config.schema import Config
from scaletrain.logs import get_logger
from scaletrain.models.lora import LoraSpec, freeze_base, held_base
from scaletrain.models.moe import ExpertParallel
from scaletrain.models.parallel import TensorParallel
from scaletrain.models.registry import build_model
from scaletrain.topology.init import Topology
from scaletrain.train.classify import classify_spec

log = get_logger(__name__)


def build_run_model(
    config: Config,
    resolved: Resolved,
    topology: Topology,
    resume_from: Path | None,
    lora_base: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """The model of this config (its family's), or this rank's pipeline stage of it; a LoRA
    base that `lora_base` names as a scaletrain checkpoint is loaded from there."""
    lora = LoraSpec.of(config.finetune)
    tp = TensorParallel(resolved.dims.tp, topology.groups.tp, lora)
    ep = ExpertParallel.of(resolved.dims.ep, topology.dp_rank)
    model = build_model(
        config.model,
        resolved.padded_vocab_size,
        tp,
        resolved.dims,
        ep,
        config.parallel.pipeline_partition,
        classify_spec(config),
    )
    # A LoRA checkpoint holds the adapters only: its base comes from init_from again, or from
    # the base checkpoint (any layout, consolidated: checkpoint/lora_base.py).
    base_checkpoint = Path(lora_base[CHECKPOINT]) if lora_base and CHECKPOINT in lora_base else None
    if base_checkpoint is not None:
        load_checkpoint_base(model, base_checkpoint, config, tp, ep)
    elif config.model.init_from and (resume_from is None or lora is not None):
        from scaletrain.hf.imports import load_hf_weights

        load_hf_weights(model, config.model, resolved.padded_vocab_size, tp, ep)
    if lora is not None:
        trainable, frozen = freeze_base(model)
        held = held_base(model)  # ZeRO-3 partitions the frozen base like every parameter
        where = "" if held is None else f", {held} of them held on this rank"
        where += " (this rank's pipeline stage)" if resolved.dims.pp > 1 else ""
        what = "adapter and score" if config.train.task == "classify" else "adapter"
        log.info(
            "LoRA: %d %s parameters train, %d base ones frozen%s", trainable, what, frozen, where
        )
    return model


def count_params(model: torch.nn.Module) -> str:
    count = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return f"{count / 1e6:.1f}M parameters (this rank)"
