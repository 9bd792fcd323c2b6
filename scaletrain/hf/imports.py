"""`model.init_from: hf:<folder>`: start a run from a local Hugging Face Llama or Mixtral folder.

Two steps. Before any process group exists (`apply_init_from`, called by the config check),
the folder's config.json becomes our model fields; a field the run's config sets to something
else is refused in one line. After the model is built (`load_hf_weights`, at any TP / PP / EP
layout and ZeRO stage), every parameter is overwritten with its slice of the HF weights, cut by
the family's split plan exactly as the checkpoint tools merge them. Weights are read from
safetensors only (never a pickle). A run that resumes a checkpoint skips the HF weights: the
checkpoint's win.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scaletrain.config.schema import Config, ModelConfig
from scaletrain.errors import ConfigError, ScaletrainError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from scaletrain.models.moe import ExpertParallel
    from scaletrain.models.parallel import TensorParallel
    from scaletrain.models.registry import Family

PREFIX = "hf:"
FIELD = "model.init_from"


def hf_folder(init_from: str) -> Path:
    if not init_from.startswith(PREFIX):
        raise ConfigError(FIELD, f"({init_from!r}) must be hf:<local folder>")
    folder = Path(init_from.removeprefix(PREFIX)).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(FIELD, f"({init_from!r}): {folder} has no config.json")
    return folder


def read_hf_config(folder: Path) -> tuple[dict[str, Any], Family]:
    """The folder's config.json and the family of its architecture (one line if unsupported)."""
    from scaletrain.models.registry import family_of_hf

    hf = json.loads((folder / "config.json").read_text())
    architectures = hf.get("architectures") or [str(hf.get("model_type"))]
    return hf, family_of_hf(architectures[0], str(folder))


def apply_init_from(config: Config) -> None:
    """Set the model fields from the HF config.json (idempotent). A field the run's config
    changed from its default to another value than the folder's is refused in one line."""
    init_from = config.model.init_from
    if not init_from:
        return
    folder = hf_folder(init_from)
    hf, family = read_hf_config(folder)
    try:
        fields = family.model_fields(hf, str(folder))
    except KeyError as missing:
        raise ConfigError(FIELD, f"{folder}/config.json has no {missing}") from None
    defaults = ModelConfig()
    for key, value in fields.items():
        current = getattr(config.model, key)
        if current == value:
            continue
        if current != getattr(defaults, key):
            raise ConfigError(
                f"model.{key}",
                f"({current}) differs from {value} in {folder}/config.json; remove it or "
                f"set {value}",
            )
        setattr(config.model, key, value)


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files (single file or shards with an index)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        found = ", ".join(p.name for p in folder.glob("*.bin")) or "none"
        raise ScaletrainError(
            f"{folder}: no .safetensors weights (found: {found}); pickled .bin weights are not "
            "read, save the model with safe_serialization"
        )
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(file))
    return weights


def full_weights(
    hf_weights: dict[str, torch.Tensor], cfg: ModelConfig, padded_vocab_size: int, where: str
) -> dict[str, torch.Tensor]:
    """Our whole model's full tensors, by our names, from the HF tensors."""
    from scaletrain.models.registry import family_of
    from scaletrain.models.split_plan import from_hf

    named = family_of(cfg).split_plan(cfg).expand(cfg.num_layers, cfg.num_experts)
    expected = {hf for _, weight, index in named for hf in weight.hf_names(**index)}
    missing = sorted(expected - set(hf_weights))
    if missing:
        raise ScaletrainError(f"{where}: weights missing for its config: {', '.join(missing[:3])}")
    out = {}
    for ours, weight, index in named:
        tensors = [hf_weights[n] for n in weight.hf_names(**index)]
        try:
            out[ours] = from_hf(weight.split, [t.float() for t in tensors], cfg, padded_vocab_size)
        except (RuntimeError, ValueError) as err:
            shapes = [list(t.shape) for t in tensors]
            raise ScaletrainError(
                f"{where}: {', '.join(weight.hf_names(**index))} of shape {shapes} does not fit "
                f"the model of its config.json ({str(err).splitlines()[0]})"
            ) from None
    return out


def load_hf_weights(
    model: nn.Module,
    cfg: ModelConfig,
    padded_vocab_size: int,
    tp: TensorParallel,
    ep: ExpertParallel,
) -> None:
    """Overwrite every parameter of `model` (whole or a pipeline stage, this TP rank's and EP
    rank's slices) with the HF folder's weights."""
    assert cfg.init_from is not None
    folder = hf_folder(cfg.init_from)
    full = full_weights(read_hf_weights(folder), cfg, padded_vocab_size, str(folder))
    load_full_weights(model, full, cfg, tp, ep, str(folder))


def load_full_weights(
    model: nn.Module,
    full: dict[str, torch.Tensor],
    cfg: ModelConfig,
    tp: TensorParallel,
    ep: ExpertParallel,
    where: str,
) -> None:
    """Overwrite every base parameter of `model` with its slice (this TP and EP rank's, this
    pipeline stage's) of `full`, whole tensors by whole-model name: an HF folder's, or a
    scaletrain checkpoint's consolidated ones (a LoRA base, checkpoint/lora_base.py)."""
    import torch
    import torch.distributed as dist

    from scaletrain.checkpoint.zero_state import expert_name, whole_name
    from scaletrain.models.lora_plan import trains_with_lora
    from scaletrain.models.registry import family_of, pipeline_layer_names
    from scaletrain.models.split_plan import split_tp

    plan = family_of(cfg).split_plan(cfg)
    tp_rank = dist.get_rank(group=tp.group) if tp.size > 1 else 0
    layers = pipeline_layer_names(cfg)
    local_experts = cfg.num_experts // max(ep.size, 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Adapters and a classifier's score start as their init made them.
            if trains_with_lora(name):
                continue
            whole = whole_name(name, layers)
            whole = expert_name(whole, ep.rank * local_experts)  # local -> global id
            if whole not in full:
                raise ScaletrainError(f"{where}: no weight {whole} for this model")
            split = plan.split_of(whole)
            piece = split_tp(full[whole], tp.size, tp_rank, split.tp_dim, split.tp_stride)
            with _whole(param):
                if piece.shape != param.shape:
                    raise ScaletrainError(
                        f"{where}: {whole} is {list(piece.shape)} on this rank, the model "
                        f"holds {list(param.shape)}"
                    )
                param.copy_(piece)


def _whole(param: nn.Parameter) -> contextlib.AbstractContextManager[object]:
    """ZeRO-3: gather the partitioned parameter for the copy, then re-partition it from DP
    rank 0's (every rank copies the same values, so the broadcast changes nothing)."""
    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=0)
