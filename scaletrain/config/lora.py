"""The rules of the `finetune` section (LoRA): values, and the layouts the adapters run with.

Checked before any process exists, so that a wrong target name or a layout the adapters do not
support yet is one line naming the field, not a traceback from inside a rank. Every layout of a
dense model is one they support: ZeRO-3 partitions the frozen base like any parameter, and each
pipeline stage holds the adapters of its own blocks (docs/finetuning.md#lora).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError

HF_PREFIX = "hf:"  # as model.init_from spells a Hugging Face folder
LORA_TARGETS = ("qkv", "out", "gate_up", "down")
"""The linear layers of a decoder block an adapter can sit on (models/layers.py)."""
MLP_TARGETS = ("gate_up", "down")
"""The MLP's: an MoE model's experts, so only the attention's (qkv, out) take adapters there."""


def lora_enabled(config: Config) -> bool:
    return config.finetune.lora_rank > 0


def check_lora(config: Config) -> None:
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
    experts = config.model.num_experts
    on_mlp = [t for t in f.lora_targets if t in MLP_TARGETS]
    if experts and on_mlp:  # every block's attention is dense; its MLPs are (mostly) experts
        raise ConfigError(
            "finetune.lora_targets",
            f"{on_mlp} with MoE (model.num_experts {experts}): the MLPs of an MoE model are "
            "its experts, which take no adapters (nor do the dense blocks' MLPs of "
            "moe_layer_freq > 1); use finetune.lora_targets=[qkv, out]",
        )
    if experts and config.model.moe_router_bias_update_rate > 0:
        raise ConfigError(
            "model.moe_router_bias_update_rate",
            f"({config.model.moe_router_bias_update_rate:g}) moves the routers' biases, a part "
            "of the frozen base, while LoRA trains; set it to 0 for LoRA",
        )


def lora_base(config: Config) -> dict[str, Any] | None:
    """Where a LoRA run's frozen base weights come from, as its checkpoints record it (they hold
    the adapters only): the model.init_from folder, or else the model's own initialisation
    from train.seed (which every resume rebuilds). None without LoRA. A base taken from a
    scaletrain checkpoint is named by checkpoint/lora_base.py instead."""
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
    if not saved.get("lora_rank") and config.checkpoint.load_weights_only:
        return  # a full checkpoint's weights as the base of new adapters
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
