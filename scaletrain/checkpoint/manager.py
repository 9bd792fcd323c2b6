"""Save and load sharded checkpoints so that a checkpoint is either complete or not visible.

Save: every rank writes its DeepSpeed shards and its RNG state into `.staging/step_N/`; the
ranks then fsync and checksum the files between them; rank 0 writes the manifest, renames the
folder to `step_N/`, and only then replaces the `latest` pointer (write + rename; `publish.py`
holds these steps and retention). A process killed at any point leaves the previous checkpoint
as the newest visible one.

Load: the newest checkpoint whose files all match the manifest wins; a truncated or corrupted
one is named in a one-line warning and the one before it is tried. A checkpoint saved with
another layout (TP, PP, DP, EP or ZeRO stage) is converted once to DeepSpeed's universal format
(`convert.py`) and loaded through it; the engine must then be built with `load_universal`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from scaletrain.checkpoint.async_save import AsyncWriter, Snapshot
from scaletrain.checkpoint.convert import (
    check_reshardable,
    conversion_target,
    describe_layout,
    ensure_universal,
    repair_optimizer,
    restore_buffers,
    same_layout,
)
from scaletrain.checkpoint.layout_convert import view_of
from scaletrain.checkpoint.manifest import (
    STAGING,
    Manifest,
    check_file,
    fsync_dir,
    list_checkpoints,
    not_a_checkpoint,
    read_latest,
    tag_for,
)
from scaletrain.checkpoint.publish import (
    delete_checkpoint,
    describe_files,
    gathered_parameter_layout,
    manifest_data,
    point_latest,
    prune,
    share_work,
)
from scaletrain.checkpoint.safe_load import check_folder, weights_only_loading
from scaletrain.checkpoint.safe_load import load as load_file
from scaletrain.checkpoint.space import agree_on_failure, space_warning
from scaletrain.checkpoint.state import TrainState, rng_state, set_rng_state
from scaletrain.config.lora import lora_base, lora_enabled
from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError, ScaletrainError
from scaletrain.logs import get_logger
from scaletrain.models.lora_plan import trains_with_lora
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
        self.writer = AsyncWriter(config.fault.collective_timeout_minutes) if c.async_save else None
        """The background writer of `checkpoint.async_save` (None: saves are synchronous)."""
        self.lora = lora_enabled(config)
        """LoRA runs save (and load) the trainable adapters only, not the frozen base."""
        self.lora_base = lora_base(config)  # for the manifests; a checkpoint's: set by Trainer
        self.identity: dict[str, Any] | None = None
        """What a resume compares (compat.run_identity), recorded in every manifest."""

    # ---- save -------------------------------------------------------------------------
    def save(self, engine: Any, state: TrainState) -> Path:
        """Collective: every rank calls this at the same step. With `checkpoint.async_save`
        it returns once the state is snapshotted (after the previous save was published);
        the folder appears when the background writer publishes it."""
        self.finish_writes()  # at most one save in flight; its staging folder goes next
        tag = tag_for(state.step)
        staging_root = self.root / STAGING
        staging = staging_root / tag
        if self.topology.is_main:  # leftovers of killed saves (and deletions) go first
            shutil.rmtree(staging_root, ignore_errors=True)
            staging_root.mkdir(parents=True, exist_ok=True)
            warning = space_warning(self.root, self.last_save_bytes)
            if warning:
                log.warning("%s", warning)
        dist.barrier()
        start = time.perf_counter()
        failure: BaseException | None = None
        snapshot: Snapshot | None = None
        capture = self.writer.capture(engine) if self.writer else contextlib.nullcontext()
        try:
            with capture as snapshot:  # async: DeepSpeed's writes become host copies
                engine.save_checkpoint(
                    str(staging_root),
                    tag=tag,
                    save_latest=False,
                    # LoRA: the frozen base stays where the manifest's lora_base says it is.
                    exclude_frozen_parameters=self.lora,
                )
        except Exception as err:  # the others wait in DeepSpeed's closing barrier: meet them
            failure = err
            dist.barrier()
        if failure is None:
            try:
                rng_file = staging / RNG_DIR / f"rank_{self.topology.rank:05d}.pt"
                rng_file.parent.mkdir(parents=True, exist_ok=True)
                if snapshot is None:
                    torch.save(rng_state(), rng_file)
                else:
                    snapshot.add(str(rng_file), rng_state())
            except Exception as err:
                failure = err
        parameters = gathered_parameter_layout(engine.module, self.topology)
        if self.lora:  # what the files hold: the adapters (+ score; the base is in lora_base)
            parameters = {n: info for n, info in parameters.items() if trains_with_lora(n)}
        if snapshot is None or self.writer is None:
            final = self._publish(staging, state, parameters, start, failure)
        else:
            agree_on_failure(
                failure, staging, self.root, self.last_save_bytes, self.topology.is_main
            )
            group = self.writer.group
            self.writer.start(
                snapshot,
                state.step,
                lambda failed: self._publish(staging, state, parameters, start, failed, group),
                start,
            )
            final = self.root / tag
        self.last_save_time = time.monotonic()
        return final

    def _publish(
        self,
        staging: Path,
        state: TrainState,
        parameters: dict[str, dict[str, Any]],
        start: float,
        failure: BaseException | None,
        group: dist.ProcessGroup | None = None,
    ) -> Path:
        """Collective in `group` (the async writer's own, or the default one): checksum every
        file, then rank 0 writes the manifest and makes the checkpoint visible."""
        final = self.root / staging.name
        is_main = self.topology.is_main
        agree_on_failure(failure, staging, self.root, self.last_save_bytes, is_main, group)
        files = self._describe_files(staging, group)
        failed = next((e for e in files if "error" in e), None)
        if failed is not None:  # every rank has the whole list
            failure = OSError(failed["errno"], failed["error"])
        agree_on_failure(failure, staging, self.root, self.last_save_bytes, is_main, group)
        manifest = None
        if is_main:
            data = manifest_data(state, self.config, self.layout(), self.identity, files)
            data["parameters"] = parameters
            data["lora_base"] = self.lora_base
            manifest = Manifest(staging, data)
            try:
                manifest.write()
                fsync_dir(staging / RNG_DIR)
                fsync_dir(staging)  # entries must be durable before the folder becomes visible
            except Exception as err:
                failure = err
        agree_on_failure(failure, staging, self.root, self.last_save_bytes, is_main, group)
        if manifest is not None:
            delete_checkpoint(self.root, final)  # a re-save of the same step
            os.replace(staging, final)
            fsync_dir(self.root)
            point_latest(self.root, final.name)
            self._prune()
            log.info(
                "saved checkpoint %s (%.1f MB) in %.2fs%s",
                final,
                manifest.total_bytes / 1e6,
                time.perf_counter() - start,
                "" if group is None else " (written in the background)",
            )
            self.last_save_bytes = manifest.total_bytes
        dist.barrier(group=group)
        return final

    def finish_writes(self) -> None:
        """Wait until the async save in flight (if any) is published; raise its error (every
        rank the same). Collective: all ranks call it at the same step."""
        if self.writer is not None:
            self.writer.wait()

    @property
    def last_write_seconds(self) -> float:
        """How long the last background save took from snapshot to published (0 if sync)."""
        return self.writer.last_write_seconds if self.writer is not None else 0.0

    def _describe_files(
        self, folder: Path, group: dist.ProcessGroup | None = None
    ) -> list[dict[str, Any]]:
        """Flush and checksum all files (publish.describe_files)."""
        return describe_files(folder, self.topology, group)

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

    def _prune(self) -> None:
        """Keep the newest `keep_last`, plus every `keep_every`-th step (publish.prune)."""
        prune(self.root, self.config.checkpoint.keep_last, self.config.checkpoint.keep_every)

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
            p
            for p in share_work(manifest.files, lambda e: check_file(folder, e), self.topology)
            if p
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
        self.finish_writes()  # a rollback must see (and not race) the save in flight
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
        weights_only = self.config.checkpoint.load_weights_only
        if self.lora and weights_only:
            return False  # a LoRA base: consolidated from any layout, DeepSpeed reads none of it
        precision = self.config.precision.dtype
        check_reshardable(manifest, self.layout(), precision, self.lora, weights_only)
        saved = describe_layout(manifest.data["layout"])
        if self.topology.is_main:
            log.info(
                "resharding %s from %s to %s", folder.name, saved, describe_layout(self.layout())
            )
        target = conversion_target(manifest, self.layout())
        ensure_universal(folder, self.root, self.topology.is_main, self._allow_pickle, target)
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
        if weights_only and self.lora:  # build_run_model loaded it as the frozen base
            log.info("LoRA over the weights of %s (new adapters, step 0)", folder)
            return None
        layout_kept = same_layout(manifest.data["layout"], self.layout())
        source = checked = folder
        if self.load_universal:  # a resharded run loads (and rolls back) through universal copies
            check_reshardable(manifest, self.layout(), self.config.precision.dtype)
            target = conversion_target(manifest, self.layout())
            source = checked = ensure_universal(
                folder, self.root, self.topology.is_main, self._allow_pickle, target
            )
            if target is not None:  # an MoE run reads its expert-parallel rank's view
                source = view_of(source, target, self.topology.dp_rank)
        elif not layout_kept:
            raise ScaletrainError(
                f"{folder} was saved as {describe_layout(manifest.data['layout'])}, this run "
                f"is {describe_layout(self.layout())}; only the checkpoint a run starts from "
                "is resharded"
            )
        # What DeepSpeed reads: the checkpoint, or its universal copy (ensure_universal checked
        # the checkpoint; a copy it reused may have been planted by whoever wrote the folder).
        self._check_external(checked, verified=True)  # the same folder on every rank
        with weights_only_loading(self._allow_pickle):
            engine.load_checkpoint(
                str(source.parent),
                tag=source.name,
                load_optimizer_states=not weights_only,
                load_lr_scheduler_states=not weights_only,
                load_module_only=weights_only,
                load_module_strict=not self.lora,  # LoRA: the adapters only; the base is loaded
            )
        if self.load_universal:
            repair_optimizer(engine, source, self._allow_pickle)
            restore_buffers(engine, source, self._allow_pickle)
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
