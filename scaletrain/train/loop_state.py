"""The loop's side of a checkpoint: which checkpoint this config may continue from (checked
before any weights load), and the loop state it hands to the checkpointer with each save."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scaletrain.checkpoint.compat import check_resume, schedule_note
from scaletrain.checkpoint.lora_base import run_lora_base
from scaletrain.checkpoint.manifest import Manifest
from scaletrain.checkpoint.state import TrainState
from scaletrain.config.lora import check_lora_resume
from scaletrain.config.schema import Config
from scaletrain.logs import get_logger
from scaletrain.train.classify import check_classify_resume

log = get_logger(__name__)


def resume_step(folder: Path | None, config: Config, identity: dict, is_main: bool) -> int:
    """Refuse a checkpoint this config cannot continue; warn once (rank 0) about a changed
    schedule. Returns the step the run starts from."""
    if folder is None:
        return 0
    manifest = Manifest.read(folder)
    assert manifest is not None  # CheckpointManager.select() verified it
    check_resume(manifest, config, identity)
    check_lora_resume(manifest.data, config)
    check_classify_resume(manifest.data, config)
    note = schedule_note(manifest, config)
    if note and is_main:
        log.warning("%s", note)
    return 0 if config.checkpoint.load_weights_only else manifest.step


def lora_base_of_run(folder: Path | None, config: Config) -> dict[str, Any] | None:
    """Where this run's LoRA base is, for its manifests (checkpoint/lora_base.py): a base
    checkpoint that is missing or changed since the LoRA run started is refused in one line."""
    return run_lora_base(config, Manifest.read(folder) if folder else None)


def train_state(
    step: int, sampler: dict[str, Any], engine: Any, seq_len: int, loss_scale: float | None
) -> TrainState:
    """Where the loop and the data stand after `step` (DeepSpeed keeps the rest)."""
    consumed = sampler["consumed_samples"]
    return TrainState(
        step=step,
        consumed_samples=consumed,
        consumed_tokens=consumed * seq_len,
        sampler=sampler,
        skipped_steps=engine.skipped_steps,
        lr_schedule={
            "last_epoch": engine.lr_scheduler.last_epoch,
            "last_lr": engine.lr_scheduler.get_last_lr(),
        },
        loss_scale=loss_scale,
    )
