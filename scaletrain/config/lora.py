"""The rules of the `finetune` section (LoRA): values, and the layouts the adapters run with.

Checked before any process exists, so that a wrong target name or a layout the adapters do not
support yet is one line naming the field, not a traceback from inside a rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError
from scaletrain.topology.dims import ParallelDims

HF_PREFIX = "hf:"  # as model.init_from spells a Hugging Face folder
LORA_TARGETS = ("qkv", "out", "gate_up", "down")
"""The linear layers of a decoder block an adapter can sit on (models/layers.py)."""


def lora_enabled(config: Config) -> bool:
    return config.finetune.lora_rank > 0


def check_lora(config: Config, dims: ParallelDims) -> None:
    f = config.finetune
    if f.lora_rank < 0:
        raise ConfigError("finetune.lora_rank", f"must be >= 0 (0 = off), got {f.lora_rank}")
    if not lora_enabled(config):
        return
    if f.lora_alpha <= 0:
        raise ConfigError("finetune.lora_alpha", f"must be > 0, got {f.lora_alpha}")
    if not 0 <= f.lora_dropout < 1:
        raise ConfigError("finetune.lora_dropout", f"must be in [0, 1), got {f.lora_dropout}")
    unknown = [t for t in f.lora_targets if t not in LORA_TARGETS]
    if unknown or not f.lora_targets:
        raise ConfigError(
            "finetune.lora_targets",
            f"{f.lora_targets} must be a non-empty list of {', '.join(LORA_TARGETS)}",
        )
    if len(set(f.lora_targets)) != len(f.lora_targets):
        raise ConfigError("finetune.lora_targets", f"{f.lora_targets} names a layer twice")
    if config.model.num_experts:
        raise ConfigError(
            "finetune.lora_rank",
            f"({f.lora_rank}) with MoE (model.num_experts {config.model.num_experts}) is not "
            "supported: adapters sit on dense blocks only; set finetune.lora_rank=0",
        )
    if dims.pp > 1:
        raise ConfigError(
            "finetune.lora_rank",
            f"({f.lora_rank}) with parallel.pp ({dims.pp}) is not supported yet; use pp=1",
        )
    if config.checkpoint.load_weights_only:
        raise ConfigError(
            "finetune.lora_rank",
            f"({f.lora_rank}) with checkpoint.load_weights_only: a base taken from a scaletrain "
            "checkpoint is not supported yet; export it (`scaletrain export hf`) and set "
            "model.init_from=hf:<folder>",
        )
    if config.parallel.zero_stage == 3:
        raise ConfigError(
            "finetune.lora_rank",
            f"({f.lora_rank}) with parallel.zero_stage 3 is not supported yet (the frozen base "
            "is not partitioned); use zero_stage 0, 1 or 2",
        )


def lora_base(config: Config) -> dict[str, Any] | None:
    """Where a LoRA run's frozen base weights come from, as its checkpoints record it (they hold
    the adapters only): the model.init_from folder, or else the model's own initialisation
    from train.seed (which every resume rebuilds). None without LoRA."""
    if not lora_enabled(config):
        return None
    if not config.model.init_from:
        return {"init_from": None, "seed": config.train.seed}
    folder = Path(config.model.init_from.removeprefix(HF_PREFIX)).expanduser().resolve()
    return {"init_from": f"{HF_PREFIX}{folder}"}


def check_lora_resume(manifest: dict[str, Any], config: Config) -> None:
    """A checkpoint continues only with the LoRA shape that saved it: a LoRA checkpoint holds
    adapters (and their optimizer state) of that rank, scale and targets only, and a full
    checkpoint has no adapters to continue. One line naming each difference."""
    saved = (manifest.get("config") or {}).get("finetune") or {}
    if not saved.get("lora_rank") and not lora_enabled(config):
        return
    now = config.finetune
    pairs = [("lora_rank", saved.get("lora_rank", 0), now.lora_rank)]
    if saved.get("lora_rank") and lora_enabled(config):  # both LoRA: the same adapters?
        pairs.append(("lora_alpha", saved.get("lora_alpha"), now.lora_alpha))
        pairs.append(("lora_targets", saved.get("lora_targets"), list(now.lora_targets)))
    found = [f"finetune.{key} {old} -> {new}" for key, old, new in pairs if old != new]
    if found:
        raise ConfigError(
            "checkpoint.resume",
            f"the checkpoint's LoRA settings differ ({', '.join(found)}); use them, or start "
            "fresh with checkpoint.resume=none or a new train.run_dir",
        )
