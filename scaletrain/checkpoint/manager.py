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
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    not_a_checkpoint,
    read_latest,
    step_of,
    tag_for,
)
from scaletrain.checkpoint.safe_load import check_folder, weights_only_loading
from scaletrain.checkpoint.safe_load import load as load_file
from scaletrain.checkpoint.space import agree_on_failure, space_warning
from scaletrain.checkpoint.state import TrainState, parameter_layout, rng_state, set_rng_state
from scaletrain.config.load import to_dict
from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError, ScaletrainError
from scaletrain.logs import get_logger
from scaletrain.topology.init import Topology

log = get_logger(__name__)

RNG_DIR = "rng"


class CheckpointManager:
    """Owns `<checkpoint dir>`: save, list, verify, pick, load and prune checkpoints."""

    def __init__(self, config: Config, topology: Topology) -> None:
        self.config = config
        self.topology = topology
        c = config.checkpoint
        self.root = Path(c.dir) if c.dir else Path(config.train.run_dir) / "checkpoints"
        self.last_save_time = time.monotonic()
        self.last_save_bytes: int | None = None  # the free-space check's estimate of a save
        self.load_universal = False  # set by prepare_reshard(): how the engine loads
        self.identity: dict[str, Any] | None = None
        """What a resume compares (compat.run_identity), recorded in every manifest."""

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
            warning = space_warning(self.root, self.last_save_bytes)
            if warning:
                log.warning("%s", warning)
        dist.barrier()
        start = time.perf_counter()
        failure: BaseException | None = None
        try:
            engine.save_checkpoint(str(staging_root), tag=tag, save_latest=False)
        except Exception as err:  # the others wait in DeepSpeed's closing barrier: meet them
            failure = err
            dist.barrier()
        if failure is None:
            try:
                (staging / RNG_DIR).mkdir(parents=True, exist_ok=True)
                torch.save(rng_state(), staging / RNG_DIR / f"rank_{self.topology.rank:05d}.pt")
            except Exception as err:
                failure = err
        agree_on_failure(failure, staging, self.root, self.last_save_bytes, self.topology.is_main)
        files = self._describe_files(staging)
        failed = next((e for e in files if "error" in e), None)
        if failed is not None:  # every rank has the whole list
            failure = OSError(failed["errno"], failed["error"])
        agree_on_failure(failure, staging, self.root, self.last_save_bytes, self.topology.is_main)
        parameters = self._parameter_layout(engine.module)
        manifest = None
        if self.topology.is_main:
            data = self._manifest_data(state, files)
            data["parameters"] = parameters
            manifest = Manifest(staging, data)
            try:
                manifest.write()
                fsync_dir(staging / RNG_DIR)
                fsync_dir(staging)  # entries must be durable before the folder becomes visible
            except Exception as err:
                failure = err
        agree_on_failure(failure, staging, self.root, self.last_save_bytes, self.topology.is_main)
        if manifest is not None:
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
            self.last_save_bytes = manifest.total_bytes
        dist.barrier()
        self.last_save_time = time.monotonic()
        return final

    def _describe_files(self, folder: Path) -> list[dict[str, Any]]:
        """Flush and checksum all files; the ranks share the work, rank 0 gets the list."""
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

        def describe(name: str) -> dict[str, Any]:
            try:
                return describe_file(folder, name)
            except OSError as err:  # fsync reports a full disk on NFS: every rank must hear
                return {"path": name, "errno": err.errno, "error": str(err)}

        described = self._share_work(names, describe)
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
            "identity": self.identity,
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
        tag = read_latest(self.root)
        if tag:
            named = self.root / tag
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
            if Manifest.read(folder) is None:  # before the pickle question: say what is wrong
                raise ConfigError("checkpoint.resume", not_a_checkpoint(folder))
            self._check_external(folder)
            problem = self.verify(folder)
            if problem:
                raise ScaletrainError(f"checkpoint.resume: {folder} is not usable: {problem}")
            self._remember_size(folder)
            return folder
        folder = self.newest_good()
        if folder is not None:
            self._remember_size(folder)
        return folder

    def _remember_size(self, folder: Path) -> None:
        """A resumed run's first free-space check uses the checkpoint it starts from."""
        manifest = Manifest.read(folder)
        if manifest is not None:
            self.last_save_bytes = manifest.total_bytes

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

    def _check_external(self, folder: Path, verified: bool = False) -> None:
        """Collective: refuse, in one line on every rank, a checkpoint with a file that holds
        more than weights (unpickling it could run code), wherever it lives: a folder's place
        says nothing about who wrote its files. Files that are no torch files at all are left
        to the checksums until `verified`."""
        if not self.config.checkpoint.allow_external_pickle:
            check_folder(folder, collective=True, unreadable=verified)

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
        ensure_universal(folder, self.root, self.topology.is_main, self._allow_pickle)
        self.load_universal = True
        return True

    @property
    def _allow_pickle(self) -> bool:
        return self.config.checkpoint.allow_external_pickle

    def load(self, engine: Any, folder: Path, full: bool = False) -> TrainState | None:
        """Collective: restore engine, RNG and loop state. None for a weights-only load
        (`checkpoint.load_weights_only`, which `full=True` overrides: a rollback needs it all).

        Every file is read by torch's weights-only unpickler, DeepSpeed's loads included
        (`safe_load`), unless `checkpoint.allow_external_pickle`."""
        manifest = Manifest.read(folder)
        assert manifest is not None  # select() verified it
        weights_only = self.config.checkpoint.load_weights_only and not full
        layout_kept = same_layout(manifest.data["layout"], self.layout())
        source = folder
        if self.load_universal:  # a resharded run loads (and rolls back) through universal copies
            check_reshardable(manifest, self.layout(), self.config.precision.dtype)
            source = ensure_universal(folder, self.root, self.topology.is_main, self._allow_pickle)
        elif not layout_kept:
            raise ScaletrainError(
                f"{folder} was saved as {describe_layout(manifest.data['layout'])}, this run "
                f"is {describe_layout(self.layout())}; only the checkpoint a run starts from "
                "is resharded"
            )
        # What DeepSpeed reads: the checkpoint, or its universal copy (ensure_universal checked
        # the checkpoint; a copy it reused may have been planted by whoever wrote the folder).
        self._check_external(source, verified=True)
        with weights_only_loading(self._allow_pickle):
            engine.load_checkpoint(
                str(source.parent),
                tag=source.name,
                load_optimizer_states=not weights_only,
                load_lr_scheduler_states=not weights_only,
                load_module_only=weights_only,
            )
        if self.load_universal:
            repair_optimizer(engine, source, self._allow_pickle)
        if weights_only:
            log.info("loaded the weights of %s (fresh optimizer, step 0)", folder)
            return None
        rng_file = folder / RNG_DIR / f"rank_{self.topology.rank:05d}.pt"
        if layout_kept and rng_file.is_file():  # rank i of the same layout
            set_rng_state(load_file(rng_file, self._allow_pickle))
        data = manifest.data
        log.info("resumed from %s (step %d)", folder, data["step"])
        return TrainState(
            step=data["step"],
            consumed_samples=data["consumed_samples"],
            consumed_tokens=data["consumed_tokens"],
            sampler=data["sampler"],
            skipped_steps=data.get("skipped_steps", 0),
        )
