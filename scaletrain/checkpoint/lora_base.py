"""A LoRA run's frozen base taken from a scaletrain checkpoint (docs/finetuning.md#lora).

`finetune.lora_rank > 0` with `checkpoint.load_weights_only=true` and `checkpoint.resume=<a
full checkpoint>` puts the adapters on that checkpoint's weights. They are read by the
consolidation code (`consolidated_weights`: every layout and ZeRO stage, to whole fp32 tensors
by name) and sliced into this run's model by the family's split plan, as an HF import is
(`hf.imports.load_full_weights`), before the engine exists. Not DeepSpeed's
`load_checkpoint(load_module_only=True)`: that reads the module files of the layout that saved
them only, so the LoRA run would have to repeat the pretraining layout, and a LoRA resume would
have to load two checkpoints through the engine (the base module-only, then the adapters).

The LoRA checkpoints' manifest names the base as `{"checkpoint": <absolute folder>,
"manifest_sha256": <its manifest.json's digest>}`; since that manifest holds every file's
checksum, the digest pins the base's bytes. A resume and `export hf` rebuild the base from it,
and refuse in one line a base that is missing or changed since the LoRA run started.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scaletrain.checkpoint.manifest import MANIFEST, Manifest
from scaletrain.config.lora import lora_base, lora_enabled
from scaletrain.config.schema import Config
from scaletrain.errors import ScaletrainError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from scaletrain.models.moe import ExpertParallel
    from scaletrain.models.parallel import TensorParallel

CHECKPOINT, DIGEST = "checkpoint", "manifest_sha256"


def checkpoint_reference(folder: Path) -> dict[str, str]:
    """How a LoRA checkpoint's `lora_base` names the base checkpoint `folder`."""
    digest = hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()
    return {CHECKPOINT: str(folder.resolve()), DIGEST: digest}


def run_lora_base(config: Config, resumed: Manifest | None) -> dict[str, Any] | None:
    """The base this run's adapters sit on (None without LoRA): the checkpoint a weights-only
    start takes, the one a resumed LoRA checkpoint names, else model.init_from or the seed."""
    if not lora_enabled(config):
        return None
    if resumed is not None and config.checkpoint.load_weights_only:
        if _is_lora(resumed):
            raise ScaletrainError(
                f"checkpoint.load_weights_only: {resumed.folder} is a LoRA checkpoint (adapters "
                "only), not a base; resume it with checkpoint.load_weights_only=false, or "
                "export it with `scaletrain export hf --merge-lora` and set "
                "model.init_from=hf:<folder>"
            )
        return checkpoint_reference(resumed.folder)
    saved = (resumed.data.get("lora_base") or {}) if resumed is not None else {}
    if CHECKPOINT in saved:
        base_checkpoint(saved, resumed.folder if resumed else None)
        return saved
    return lora_base(config)


def _is_lora(manifest: Manifest) -> bool:
    return bool(((manifest.data.get("config") or {}).get("finetune") or {}).get("lora_rank"))


def base_checkpoint(reference: dict[str, Any] | None, lora: Path | None) -> Path | None:
    """The base checkpoint folder `reference` names, as it was when the LoRA run (checkpoint
    `lora`) started; None for a base that is no checkpoint. One line if missing or changed."""
    if not reference or CHECKPOINT not in reference:
        return None
    folder = Path(reference[CHECKPOINT])
    owner = f"the LoRA checkpoint {lora}" if lora else "this LoRA run"
    again = f"start a new LoRA run over it (checkpoint.resume={folder} load_weights_only=true)"
    if not (folder / MANIFEST).is_file():
        raise ScaletrainError(
            f"lora_base: the base checkpoint {folder} of {owner} is missing; restore it, or {again}"
        )
    now = checkpoint_reference(folder)[DIGEST]
    if now != reference.get(DIGEST):
        raise ScaletrainError(
            f"lora_base: the base checkpoint {folder} of {owner} changed since the LoRA run "
            f"started (manifest.json sha256 {str(reference.get(DIGEST))[:12]} -> {now[:12]}); "
            f"restore it, or {again}"
        )
    return folder


def base_weights(folder: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The base checkpoint's whole fp32 weights (and buffers) by name, from any layout."""
    from scaletrain.checkpoint.consolidate import consolidated_weights

    manifest, weights = consolidated_weights(folder, allow_pickle)
    if _is_lora(manifest):
        raise ScaletrainError(f"lora_base: {folder} is a LoRA checkpoint, not a base")
    return weights


def load_checkpoint_base(
    model: nn.Module,
    folder: Path,
    config: Config,
    tp: TensorParallel,
    ep: ExpertParallel,
) -> None:
    """Fill the base of `model` (this rank's slices) from checkpoint `folder`; the adapters
    keep their init. Buffers the checkpoint holds (an MoE router's score_bias) come too."""
    import torch

    from scaletrain.checkpoint.zero_state import whole_name
    from scaletrain.hf.imports import load_full_weights
    from scaletrain.models.registry import pipeline_layer_names

    full = base_weights(folder, config.checkpoint.allow_external_pickle)
    load_full_weights(model, full, config.model, tp, ep, str(folder))
    layers = pipeline_layer_names(config.model)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            whole = whole_name(name, layers)
            if whole in full and full[whole].shape == buffer.shape:
                buffer.copy_(full[whole])
