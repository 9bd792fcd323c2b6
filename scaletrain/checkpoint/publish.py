"""How a written checkpoint becomes visible, and how old ones go away (CheckpointManager's
save path): the ranks checksum the files between them, rank 0 writes the manifest from these
fields, renames the folder and then replaces `latest`; retention hides a checkpoint with one
rename before deleting it, so a kill at any point never leaves a visible checkpoint with files
missing."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from scaletrain.checkpoint.convert import prune_conversions
from scaletrain.checkpoint.manifest import (
    FORMAT_VERSION,
    LATEST,
    STAGING,
    describe_file,
    fsync_dir,
    list_checkpoints,
    step_of,
)
from scaletrain.checkpoint.state import TrainState, parameter_layout
from scaletrain.config.load import to_dict
from scaletrain.config.lora import lora_base
from scaletrain.config.schema import Config
from scaletrain.topology.init import Topology


def share_work(
    items: list[Any],
    work: Callable[[Any], Any],
    topology: Topology,
    group: dist.ProcessGroup | None = None,
) -> list[Any]:
    """Collective: every rank does `work` on its round-robin share; all get all results."""
    mine = [work(item) for item in items[topology.rank :: topology.world_size]]
    gathered: list[list[Any]] = [[] for _ in range(topology.world_size)]
    dist.all_gather_object(gathered, mine, group=group)
    return [result for part in gathered for result in part]


def describe_files(
    folder: Path, topology: Topology, group: dist.ProcessGroup | None = None
) -> list[dict[str, Any]]:
    """Collective: flush and checksum all files, the ranks sharing the work; every rank gets
    the whole sorted list (a file that failed carries its errno and error)."""
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    def describe(name: str) -> dict[str, Any]:
        try:
            return describe_file(folder, name)
        except OSError as err:  # fsync reports a full disk on NFS: every rank must hear
            return {"path": name, "errno": err.errno, "error": str(err)}

    described = share_work(names, describe, topology, group)
    return sorted(described, key=lambda e: e["path"])


def gathered_parameter_layout(
    module: torch.nn.Module, topology: Topology
) -> dict[str, dict[str, Any]]:
    """Collective with pp > 1: rank 0 holds only the first stage, so all stages report."""
    layout = parameter_layout(module)
    if topology.dims.pp == 1:
        return layout
    stages: list[dict[str, dict[str, Any]]] = [{} for _ in range(topology.world_size)]
    dist.all_gather_object(stages, layout)
    return {name: info for stage in stages for name, info in sorted(stage.items())}


def manifest_data(
    state: TrainState,
    config: Config,
    layout: dict[str, Any],
    identity: dict[str, Any] | None,
    files: list[dict[str, Any]],
) -> dict[str, Any]:
    """The manifest's fields besides `parameters`."""
    return {
        "format_version": FORMAT_VERSION,
        "step": state.step,
        "consumed_samples": state.consumed_samples,
        "consumed_tokens": state.consumed_tokens,
        "skipped_steps": state.skipped_steps,
        "sampler": state.sampler,
        "lr_schedule": state.lr_schedule,
        "loss_scale": state.loss_scale,
        "layout": layout,
        "precision": config.precision.dtype,
        "config": to_dict(config),
        "identity": identity,
        "lora_base": lora_base(config),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }


def point_latest(root: Path, tag: str) -> None:
    """Replace `latest` in one rename: readers see the old name or the new one."""
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(tag + "\n")
    os.replace(tmp, root / LATEST)
    fsync_dir(root)


def delete_checkpoint(root: Path, folder: Path) -> None:
    """Hide a checkpoint with one rename, then delete it: a kill mid-way never leaves a
    visible checkpoint with files missing."""
    if not folder.exists():
        return
    doomed = root / STAGING / f"deleting-{folder.name}"
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune(root: Path, keep_last: int, keep_every: int) -> None:
    """Keep the newest `keep_last`, plus every `keep_every`-th step; drop the universal copies
    of checkpoints that are gone."""
    folders = list_checkpoints(root)
    keep = set(folders[-keep_last:])
    if keep_every:
        keep |= {p for p in folders if (step_of(p) or 0) % keep_every == 0}
    for folder in folders:
        if folder not in keep:
            delete_checkpoint(root, folder)
    prune_conversions(root)
