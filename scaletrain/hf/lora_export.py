"""`scaletrain export hf --merge-lora | --lora-adapter`: a LoRA checkpoint out to Hugging Face.

A LoRA checkpoint holds the adapters only; its manifest's `lora_base` names the frozen base
(the model.init_from folder, or a scaletrain checkpoint: its consolidated weights; peft loads the
adapter over that checkpoint exported with `export hf`). `--merge-lora` folds alpha / r * B A
into the base weights and writes a plain model folder; `--lora-adapter` writes what
`peft.PeftModel.from_pretrained` loads over that base: adapter_config.json and
adapter_model.safetensors under peft's names.
Our fused layers carry one adapter each; peft has one per HF projection, so a fused qkv
adapter becomes q/k/v adapters that share A and take their rows of B (gate|up alike), cut by
the family's split plan: the same function that cuts the base weights. A classifier's (train.task:
classify) base is the language model without its head; its score head trains in full and is
merged as is, or saved in the adapter file as peft saves `modules_to_save=["score"]`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from scaletrain.config.schema import ModelConfig
from scaletrain.errors import ScaletrainError
from scaletrain.hf.staging import staged_folder
from scaletrain.models.classify_plan import SCORE_WEIGHT, decoder_only, is_classifier
from scaletrain.models.lora_plan import is_lora_name, lora_weights
from scaletrain.models.registry import family_of
from scaletrain.models.split_plan import to_hf

if TYPE_CHECKING:
    from scaletrain.hf.classify_export import ClassifierExport

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
README = "README.md"
PEFT_PREFIX = "base_model.model."  # how peft names a causal LM's modules in its files


def lora_finetune(manifest_config: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's `finetune` section if it trained LoRA adapters, else None."""
    finetune = manifest_config.get("finetune") or {}
    return finetune if finetune.get("lora_rank") else None


def base_folder(lora_base: dict[str, Any] | None, checkpoint: Path) -> Path:
    """The Hugging Face folder a LoRA checkpoint's adapters sit on (one line if it has none)."""
    init_from = (lora_base or {}).get("init_from")
    if not init_from:
        raise ScaletrainError(
            f"export: the LoRA base of {checkpoint} is its run's random initialisation (no "
            "model.init_from); only adapters over a Hugging Face base can be exported"
        )
    from scaletrain.hf.imports import hf_folder

    return hf_folder(init_from)


def with_base(
    adapters: dict[str, torch.Tensor], folder: Path, cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """The base's full weights (our names, padded vocabulary) with the trained adapters."""
    from scaletrain.hf.imports import full_weights, read_hf_weights

    assert cfg.vocab_size is not None
    padded = cfg.padded_vocab_size(cfg.vocab_size)
    base = full_weights(read_hf_weights(folder), cfg, padded, str(folder))
    return {**base, **adapters}


def peft_state_dict(
    adapters: dict[str, torch.Tensor], cfg: ModelConfig, targets: list[str]
) -> dict[str, torch.Tensor]:
    """Our full adapter tensors under peft's names (one A and B per HF projection)."""
    plan = family_of(cfg).split_plan(cfg)
    entries = lora_weights(plan, targets)
    out: dict[str, torch.Tensor] = {}
    for name, full in adapters.items():
        weight, index = next((w, i) for w in entries if (i := _match(w, name)) is not None)
        names = weight.hf_names(**index)
        tensors = to_hf(weight.split, full, cfg, len(names))
        if len(tensors) == 1:  # a shared A (or an unsplit B): every projection gets it
            tensors = tensors * len(names)
        for hf_name, tensor in zip(names, tensors, strict=True):
            out[PEFT_PREFIX + hf_name] = tensor.clone(memory_format=torch.contiguous_format)
    return out


def _match(weight, name: str) -> dict[str, int] | None:
    found = weight.pattern.fullmatch(name)
    return None if found is None else {k: int(v) for k, v in found.groupdict().items()}


def peft_config(
    finetune: dict[str, Any], modules: list[str], base: Path, classifier: bool = False
) -> dict[str, Any]:
    """adapter_config.json: a plain LoRA adapter (no bias, no rsLoRA) of a causal LM, or of a
    sequence classifier whose score head is saved whole (peft's modules_to_save)."""
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if classifier else "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": int(finetune["lora_rank"]),
        "lora_alpha": float(finetune["lora_alpha"]),
        "lora_dropout": float(finetune["lora_dropout"]),
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": [SCORE_WEIGHT.removesuffix(".weight")] if classifier else None,
    }


def write_peft_adapter(
    weights: dict[str, torch.Tensor],
    cfg: ModelConfig,
    finetune: dict[str, Any],
    base: Path,
    out: Path,
    classifier: ClassifierExport | None = None,
) -> int:
    """Write the adapters of `weights` as a peft folder at `out` (replacing it, renamed into
    place when complete); returns the number of parameters written. A classifier's trained
    score goes with them (peft's name for a module to save) and a README.md says how to load
    the base with that head (`ClassifierExport.peft_readme`)."""
    from safetensors.torch import save_file

    adapters = {k: v for k, v in weights.items() if is_lora_name(k)}
    state = peft_state_dict(adapters, cfg, list(finetune["lora_targets"]))
    modules = sorted({k.split(".")[-3] for k in state})
    if classifier is not None:
        adapters[SCORE_WEIGHT] = weights[SCORE_WEIGHT]
        state[PEFT_PREFIX + SCORE_WEIGHT] = weights[SCORE_WEIGHT].contiguous()
    with staged_folder(out) as partial:
        partial.mkdir()
        save_file(state, partial / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        config = peft_config(finetune, modules, base, classifier is not None)
        (partial / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if classifier is not None:
            (partial / README).write_text(classifier.peft_readme(base, out.resolve()))
    return sum(t.numel() for t in adapters.values())


def lora_export_weights(
    checkpoint: Path,
    manifest: dict[str, Any],
    cfg: ModelConfig,
    adapters: dict[str, torch.Tensor],
    mode: str | None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, Path | None]:
    """For `export hf` (`mode`: merge, adapter or None): the weights to write, the checkpoint's
    `finetune` section and the base folder. A LoRA checkpoint needs a mode, a mode needs one."""
    finetune = lora_finetune(manifest.get("config") or {})
    flag = {"merge": "--merge-lora", "adapter": "--lora-adapter"}.get(mode or "")
    if finetune is None:
        if flag:
            raise ScaletrainError(f"{flag}: {checkpoint} is not a LoRA checkpoint")
        return adapters, None, None
    if flag is None:
        raise ScaletrainError(
            f"export: {checkpoint} holds LoRA adapters only; pass --merge-lora (the base with "
            "the adapters folded in) or --lora-adapter (a peft adapter folder)"
        )
    from scaletrain.checkpoint.lora_base import base_checkpoint, base_weights

    base = base_checkpoint(manifest.get("lora_base"), checkpoint)  # a scaletrain checkpoint's
    if base is not None:  # the weights it was saved with (padded vocabulary, our names)
        weights = {**base_weights(base), **adapters}
    else:
        base = base_folder(manifest.get("lora_base"), checkpoint)
        weights = with_base(adapters, base, cfg)
    if is_classifier(manifest.get("config") or {}):  # its base is a language model's
        weights = decoder_only(weights)
    if mode == "merge":
        from scaletrain.models.lora_plan import merge_adapters

        weights = merge_adapters(weights, finetune)
    return weights, finetune, base
