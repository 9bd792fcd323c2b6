"""Save and load sharded checkpoints so that a checkpoint is either complete or not visible.

Save: every rank writes its DeepSpeed shards and its RNG state into `.staging/step_N/`; the
ranks then fsync and checksum the files between them; rank 0 writes the manifest, renames the
folder to `step_N/`, and only then replaces the `latest` pointer (write + rename). A process
killed at any point leaves the previous checkpoint as the newest visible one.

Load: the newest checkpoint whose files all match the manifest wins; a truncated or corrupted
one is named in a one-line warning and the one before it is tried. A checkpoint saved with
another layout (TP, DP or ZeRO stage) is converted once to DeepSpeed's universal format
(`convert.py`) and loaded through it; the engine must then be built with `load_universal`.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from scaletrain.checkpoint.convert import (
    check_reshardable,
    describe_layout,
    ensure_universal,
    prune_conversions,
    repair_optimizer,
    same_layout,
)
from scaletrain.checkpoint.manifest import (
    FORMAT_VERSION,
    LATEST,
    STAGING,
    Manifest,
    check_file,
    describe_file,
    fsync_dir,
    list_checkpoints,
    step_of,
    tag_for,
)
from scaletrain.config.load import to_dict
from scaletrain.config.schema import Config
from scaletrain.errors import ScaletrainError
from scaletrain.logs import get_logger
from scaletrain.topology.init import Topology

log = get_logger(__name__)

RNG_DIR = "rng"


@dataclass
class TrainState:
    """Everything a resume needs besides what DeepSpeed keeps (weights, optimizer, schedule,
    loss scale): where the loop and the data stand."""

    step: int
    consumed_samples: int
    consumed_tokens: int
    sampler: dict[str, Any]
    skipped_steps: int = 0
    lr_schedule: dict[str, Any] | None = None
    """Recorded for people and tools (DeepSpeed restores the schedule itself)."""
    loss_scale: float | None = None
    """fp16's dynamic loss scale, recorded likewise (DeepSpeed restores it)."""


def rng_state() -> dict[str, Any]:
    """This rank's random generators, as tensors and plain numbers (loadable weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def parameter_layout(module: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Per parameter: this rank's shape and how TP splits it (megatron-core's attributes).

    With this a checkpoint of any TP degree can be merged or re-split without the model code.
    """
    layout = {}
    for name, param in module.named_parameters():
        shape = getattr(param, "ds_shape", None) or param.shape  # ZeRO-3 keeps it aside
        split = getattr(param, "tensor_model_parallel", False)
        layout[name] = {
            "shape": list(shape),
            "tp_dim": int(param.partition_dim) if split else None,
            "tp_stride": int(getattr(param, "partition_stride", 1)) if split else None,
        }
    return layout


class CheckpointManager:
    """Owns `<checkpoint dir>`: save, list, verify, pick, load and prune checkpoints."""

    def __init__(self, config: Config, topology: Topology) -> None:
        self.config = config
        self.topology = topology
        c = config.checkpoint
        self.root = Path(c.dir) if c.dir else Path(config.train.run_dir) / "checkpoints"
        self.last_save_time = time.monotonic()
        self.load_universal = False  # set by prepare_reshard(): how the engine loads

    # ---- save -------------------------------------------------------------------------
    def save(self, engine: Any, state: TrainState) -> Path:
        """Collective: every rank calls this at the same step."""
        tag = tag_for(state.step)
        staging_root = self.root / STAGING
        staging = staging_root / tag
        final = self.root / tag
        if self.topology.is_main:  # leftovers of killed saves (and deletions) go first
            shutil.rmtree(staging_root, ignore_errors=True)
            staging_root.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        start = time.perf_counter()
        engine.save_checkpoint(str(staging_root), tag=tag, save_latest=False)
        (staging / RNG_DIR).mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), staging / RNG_DIR / f"rank_{self.topology.rank:05d}.pt")
        dist.barrier()
        files = self._describe_files(staging)
        parameters = self._parameter_layout(engine.module)
        if self.topology.is_main:
            data = self._manifest_data(state, files)
            data["parameters"] = parameters
            manifest = Manifest(staging, data)
            manifest.write()
            fsync_dir(staging / RNG_DIR)
            fsync_dir(staging)  # the entries must be durable before the folder becomes visible
            self._delete(final)  # a re-save of the same step
            os.replace(staging, final)
            fsync_dir(self.root)
            self._point_latest(tag)
            self._prune()
            log.info(
                "saved checkpoint %s (%.1f MB) in %.2fs",
                final,
                manifest.total_bytes / 1e6,
                time.perf_counter() - start,
            )
        dist.barrier()
        self.last_save_time = time.monotonic()
        return final

    def _describe_files(self, folder: Path) -> list[dict[str, Any]]:
        """Flush and checksum all files; the ranks share the work, rank 0 gets the list."""
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        described = self._share_work(names, lambda name: describe_file(folder, name))
        return sorted(described, key=lambda e: e["path"])

    def _parameter_layout(self, module: torch.nn.Module) -> dict[str, dict[str, Any]]:
        """Collective with pp > 1: rank 0 holds only the first stage, so all stages report."""
        layout = parameter_layout(module)
        if self.topology.dims.pp == 1:
            return layout
        stages: list[dict[str, dict[str, Any]]] = [{} for _ in range(self.topology.world_size)]
        dist.all_gather_object(stages, layout)
        return {name: info for stage in stages for name, info in sorted(stage.items())}

    def _share_work(self, items: list[Any], work: Callable[[Any], Any]) -> list[Any]:
        """Collective: every rank does `work` on its round-robin share; all get all results."""
        mine = [work(item) for item in items[self.topology.rank :: self.topology.world_size]]
        gathered: list[list[Any]] = [[] for _ in range(self.topology.world_size)]
        dist.all_gather_object(gathered, mine)
        return [result for part in gathered for result in part]

    def layout(self) -> dict[str, Any]:
        """This run's layout, as the manifest records it."""
        dims = self.topology.dims
        return {
            "tp": dims.tp,
            "pp": dims.pp,
            "dp": dims.dp,
            "ep": dims.ep,
            "zero_stage": self.config.parallel.zero_stage,
            "world_size": dims.world_size,
        }

    def _manifest_data(self, state: TrainState, files: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "step": state.step,
            "consumed_samples": state.consumed_samples,
            "consumed_tokens": state.consumed_tokens,
            "skipped_steps": state.skipped_steps,
            "sampler": state.sampler,
            "lr_schedule": state.lr_schedule,
            "loss_scale": state.loss_scale,
            "layout": self.layout(),
            "precision": self.config.precision.dtype,
            "config": to_dict(self.config),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": files,
        }

    def _point_latest(self, tag: str) -> None:
        tmp = self.root / f".{LATEST}.tmp"
        tmp.write_text(tag + "\n")
        os.replace(tmp, self.root / LATEST)
        fsync_dir(self.root)

    def _prune(self) -> None:
        """Keep the newest `keep_last`, plus every `keep_every`-th step."""
        c = self.config.checkpoint
        folders = list_checkpoints(self.root)
        keep = set(folders[-c.keep_last :])
        if c.keep_every:
            keep |= {p for p in folders if (step_of(p) or 0) % c.keep_every == 0}
        for folder in folders:
            if folder not in keep:
                self._delete(folder)
        prune_conversions(self.root)

    def _delete(self, folder: Path) -> None:
        """Hide a checkpoint with one rename, then delete it: a kill mid-way never leaves a
        visible checkpoint with files missing."""
        if not folder.exists():
            return
        doomed = self.root / STAGING / f"deleting-{folder.name}"
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def due(self, step: int) -> bool:
        """Whether the interval (in steps or minutes) says to save after `step`."""
        c = self.config.checkpoint
        if c.interval and step % c.interval == 0:
            return True
        minutes = (time.monotonic() - self.last_save_time) / 60
        return bool(c.interval_minutes) and minutes >= c.interval_minutes

    # ---- load -------------------------------------------------------------------------
    def candidates(self) -> list[Path]:
        """Checkpoints to try, newest first; `latest` first when it names one."""
        found = list(reversed(list_checkpoints(self.root)))
        pointer = self.root / LATEST
        if pointer.is_file():
            named = self.root / pointer.read_text().strip()
            if named in found:
                found.remove(named)
                found.insert(0, named)
        return found

    def verify(self, folder: Path) -> str | None:
        """Collective: None if every file matches the manifest, else the first problem."""
        manifest = Manifest.read(folder)
        if manifest is None:  # every rank reads the same file, so all return here together
            return f"{folder.name}/manifest.json is missing or unreadable"
        found = sorted(
            p for p in self._share_work(manifest.files, lambda e: check_file(folder, e)) if p
        )
        return found[0] if found else None

    def select(self) -> Path | None:
        """The checkpoint `checkpoint.resume` asks for, verified; None to start fresh."""
        resume = self.config.checkpoint.resume
        if resume == "none":
            return None
        if resume != "auto":
            folder = Path(resume)
            self._check_external(folder)
            problem = self.verify(folder)
            if problem:
                raise ScaletrainError(f"checkpoint.resume: {folder} is not usable: {problem}")
            return folder
        return self.newest_good()

    def newest_good(self) -> Path | None:
        """Collective: the newest checkpoint that verifies, warning about each one that does not."""
        for folder in self.candidates():
            problem = self.verify(folder)
            if problem is None:
                return folder
            if self.topology.is_main:  # every rank knows; one says it
                log.warning(
                    "checkpoint %s is not usable (%s); trying the one before", folder, problem
                )
        return None

    def _check_external(self, folder: Path) -> None:
        inside = folder.resolve().is_relative_to(self.root.resolve())
        if not inside and not self.config.checkpoint.allow_external_pickle:
            raise ScaletrainError(
                f"checkpoint.resume: {folder} is outside this run's checkpoints ({self.root}) "
                "and DeepSpeed loads it with pickle; set checkpoint.allow_external_pickle=true "
                "if you trust it"
            )

    def prepare_reshard(self, folder: Path | None) -> bool:
        """Collective, before the engine is built: True if `folder` was saved with another
        layout; then its universal copy is made (once) and the engine must be built with
        `load_universal`, after which every load goes through a universal copy."""
        manifest = Manifest.read(folder) if folder else None
        if manifest is None or same_layout(manifest.data["layout"], self.layout()):
            return False
        saved = describe_layout(manifest.data["layout"])
        if self.config.checkpoint.load_weights_only:
            raise ScaletrainError(
                f"checkpoint.load_weights_only: {folder} is {saved}; taking only the weights "
                "on another layout is not supported"
            )
        check_reshardable(manifest, self.layout(), self.config.precision.dtype)
        if self.topology.is_main:
            log.info(
                "resharding %s from %s to %s", folder.name, saved, describe_layout(self.layout())
            )
        ensure_universal(folder, self.root, self.topology.is_main)
        self.load_universal = True
        return True

    def load(self, engine: Any, folder: Path, full: bool = False) -> TrainState | None:
        """Collective: restore engine, RNG and loop state. None for a weights-only load
        (`checkpoint.load_weights_only`, which `full=True` overrides: a rollback needs it all)."""
        manifest = Manifest.read(folder)
        assert manifest is not None  # select() verified it
        weights_only = self.config.checkpoint.load_weights_only and not full
        layout_kept = same_layout(manifest.data["layout"], self.layout())
        source = folder
        if self.load_universal:  # a resharded run loads (and rolls back) through universal copies
            check_reshardable(manifest, self.layout(), self.config.precision.dtype)
            source = ensure_universal(folder, self.root, self.topology.is_main)
        elif not layout_kept:
            raise ScaletrainError(
                f"{folder} was saved as {describe_layout(manifest.data['layout'])}, this run "
                f"is {describe_layout(self.layout())}; only the checkpoint a run starts from "
                "is resharded"
            )
        engine.load_checkpoint(
            str(source.parent),
            tag=source.name,
            load_optimizer_states=not weights_only,
            load_lr_scheduler_states=not weights_only,
            load_module_only=weights_only,
        )
        if self.load_universal:
            repair_optimizer(engine, source)
        if weights_only:
            log.info("loaded the weights of %s (fresh optimizer, step 0)", folder)
            return None
        rng_file = folder / RNG_DIR / f"rank_{self.topology.rank:05d}.pt"
        if layout_kept and rng_file.is_file():  # rank i of the same layout
            set_rng_state(torch.load(rng_file, weights_only=True))
        data = manifest.data
        log.info("resumed from %s (step %d)", folder, data["step"])
        return TrainState(
            step=data["step"],
            consumed_samples=data["consumed_samples"],
            consumed_tokens=data["consumed_tokens"],
            sampler=data["sampler"],
            skipped_steps=data.get("skipped_steps", 0),
        )
