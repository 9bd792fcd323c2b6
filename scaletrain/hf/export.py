"""`scaletrain export hf`: a checkpoint as a Hugging Face folder that `transformers` loads offline.

The weights come whole and fp32 from `scaletrain.checkpoint.consolidate` (any TP degree, DP
size and ZeRO stage, fp32 or bf16 masters; every file read weights-only through `safe_load`),
are renamed and cut by the family's split plan (`scaletrain.models.split_plan`), and written by
transformers' own `save_pretrained` (safetensors shards of at most 5 GB with their index,
config.json, generation_config.json) into a folder that is renamed into place when complete.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from scaletrain.checkpoint.consolidate import consolidated_weights
from scaletrain.checkpoint.manifest import MANIFEST, list_checkpoints, read_latest
from scaletrain.checkpoint.tools import checkpoints_root
from scaletrain.config.schema import ModelConfig
from scaletrain.errors import ScaletrainError
from scaletrain.hf.classify_export import ClassifierExport, classifier_export
from scaletrain.hf.lora_export import lora_export_weights, write_peft_adapter
from scaletrain.hf.staging import staged_folder
from scaletrain.models.classify_plan import is_classifier, with_score
from scaletrain.models.registry import Family, family_of, saved_model_config
from scaletrain.models.split_plan import to_hf

MAX_SHARD = "5GB"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Exported:
    out: Path
    checkpoint: Path
    architecture: str
    parameters: int


def find_checkpoint(path: Path) -> Path:
    """`path` if it is a checkpoint folder, else the latest complete checkpoint of the run."""
    if (path / MANIFEST).is_file():
        return path
    root = checkpoints_root(path)
    tag = read_latest(root)
    if tag and (root / tag / MANIFEST).is_file():
        return root / tag
    found = list_checkpoints(root)
    if not found:
        raise ScaletrainError(f"{path}: no complete checkpoint to export")
    return found[-1]


def hf_state_dict(
    weights: dict[str, torch.Tensor], cfg: ModelConfig, family: Family, classifier: bool = False
) -> dict[str, torch.Tensor]:
    """Our full weights under their Hugging Face (safetensors file) names."""
    plan = family.split_plan(cfg)
    plan = with_score(plan) if classifier else plan
    out: dict[str, torch.Tensor] = {}
    for name, full in weights.items():
        weight, index = plan.find(name)
        names = weight.hf_names(**index)
        for hf_name, tensor in zip(names, to_hf(weight.split, full, cfg, len(names)), strict=True):
            out[hf_name] = tensor.contiguous()
    return out


def export_hf(
    source: Path,
    out: Path,
    dtype: str = "fp32",
    tokenizer: Path | None = None,
    force: bool = False,
    lora: str | None = None,
) -> Exported:
    """Write checkpoint (or run folder) `source` as a Hugging Face model folder `out`; a LoRA
    checkpoint with `lora` merge (its base with the adapters folded in) or adapter (a peft
    adapter folder, see `scaletrain.hf.lora_export`)."""
    if out.exists() and not force:
        raise ScaletrainError(f"{out} exists; pass --force to replace it")
    checkpoint = find_checkpoint(source)
    manifest_cfg = _manifest_config(checkpoint)
    cfg = saved_model_config(manifest_cfg)
    family = family_of(cfg)
    family.exportable(cfg, str(checkpoint))
    tok_dir = tokenizer or _data_tokenizer(manifest_cfg)
    cfg = replace(cfg, vocab_size=_real_vocab(cfg, manifest_cfg, tok_dir))
    manifest, weights = consolidated_weights(checkpoint)
    weights, finetune, base = lora_export_weights(checkpoint, manifest.data, cfg, weights, lora)
    head = None
    if is_classifier(manifest_cfg):
        head = classifier_export(manifest_cfg, weights, str(checkpoint))
    if finetune is not None and base is not None and lora == "adapter":
        count = write_peft_adapter(weights, cfg, finetune, base, out, head)
        kind = " for sequence classification (load it as its README.md says)" if head else ""
        return Exported(out, checkpoint, f"a peft LoRA adapter{kind}", count)
    count = write_hf_folder(weights, cfg, out, dtype, tok_dir, classifier=head)
    architecture = head.architecture(family.hf_architecture) if head else family.hf_architecture
    return Exported(out, checkpoint, architecture, count)


def write_hf_folder(
    weights: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out: Path,
    dtype: str = "fp32",
    tokenizer: Path | None = None,
    max_shard_size: str = MAX_SHARD,
    classifier: ClassifierExport | None = None,
) -> int:
    """Write our full weights (whole-model names, real `cfg.vocab_size`) as an HF folder at
    `out`, replacing it; returns the number of parameters written. With `classifier` the
    folder is the family's sequence classifier (`scaletrain.hf.classify_export`)."""
    family = family_of(cfg)
    state = hf_state_dict(weights, cfg, family, classifier is not None)
    with staged_folder(out) as partial:
        _save(state, cfg, family, DTYPES[dtype], tokenizer, partial, max_shard_size, classifier)
    return sum(t.numel() for t in state.values())


def _save(
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    family: Family,
    dtype: torch.dtype,
    tok_dir: Path | None,
    out: Path,
    max_shard_size: str,
    classifier: ClassifierExport | None = None,
) -> None:
    import transformers

    fields = family.hf_config(cfg)
    architecture = family.hf_architecture
    if classifier is not None:
        architecture = classifier.architecture(architecture)
        fields = {**fields, **classifier.hf_config(), "architectures": [architecture]}
    config = transformers.AutoConfig.for_model(**fields)
    eos = bos = None
    if tok_dir is not None:
        bos, eos = _save_tokenizer(tok_dir, out, pad=classifier is not None)
        config.eos_token_id, config.bos_token_id = eos, bos
    # transformers' own loading (its conversion of file names to its in-memory layout, e.g.
    # Mixtral's stacked experts) and saving (shards, index, config, generation config).
    model_class = getattr(transformers, architecture)
    model, info = model_class.from_pretrained(
        None,
        config=config,
        state_dict={k: v.to(dtype) for k, v in state.items()},
        dtype=dtype,
        output_loading_info=True,
    )
    missing = [
        m for m in info["missing_keys"] if not (cfg.tie_embeddings and m == "lm_head.weight")
    ]
    if missing or info["unexpected_keys"] or info.get("mismatched_keys"):
        raise ScaletrainError(
            f"export: transformers did not take the weights (missing {missing[:3]}, "
            f"unexpected {sorted(info['unexpected_keys'])[:3]}, "
            f"mismatched {list(info.get('mismatched_keys') or [])[:3]})"
        )
    model.generation_config = transformers.GenerationConfig(bos_token_id=bos, eos_token_id=eos)
    model.save_pretrained(out, max_shard_size=max_shard_size)


def _save_tokenizer(tok_dir: Path, out: Path, pad: bool = False) -> tuple[int, int]:
    """The tokenizer as transformers' fast tokenizer files; returns (bos id, eos id). `pad`:
    eos is also the pad token (a classifier's data is padded with it)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from scaletrain.data.tokenizer import load_tokenizer

    ours = load_tokenizer(tok_dir)
    backend = Tokenizer.from_str(ours.tokenizer.to_str())
    backend.encode_special_tokens = False  # HF's usual behaviour: "<|endoftext|>" is eos
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=ours.eos_token,
        bos_token=ours.eos_token,
        pad_token=ours.eos_token if pad else None,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(out)
    return ours.eos_id, ours.eos_id


def _manifest_config(checkpoint: Path) -> dict[str, Any]:
    import json

    return json.loads((checkpoint / MANIFEST).read_text()).get("config") or {}


def _data_tokenizer(config: dict[str, Any]) -> Path | None:
    """The tokenizer the run's first data set was prepared with, when that folder is here."""
    from scaletrain.data.format import TOKENIZER_DIR

    paths = (config.get("data") or {}).get("paths") or []
    folder = Path(paths[0]) / TOKENIZER_DIR if paths else None
    return folder if folder is not None and folder.is_dir() else None


def _real_vocab(cfg: ModelConfig, config: dict[str, Any], tok_dir: Path | None) -> int:
    """The vocabulary without the padding rows: the config's, the data set's or the tokenizer's."""
    if cfg.vocab_size:
        return cfg.vocab_size
    paths = (config.get("data") or {}).get("paths") or []
    if paths and (Path(paths[0]) / "metadata.json").is_file():
        from scaletrain.data.format import read_metadata

        return read_metadata(paths[0]).vocab_size
    if tok_dir is not None:
        from scaletrain.data.tokenizer import load_tokenizer

        return load_tokenizer(tok_dir).vocab_size
    raise ScaletrainError(
        "export: the checkpoint's vocabulary size is unknown (model.vocab_size null, its data "
        "set not found); pass --tokenizer DIR"
    )
