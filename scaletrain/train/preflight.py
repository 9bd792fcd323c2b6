"""Checks of the run directory, the data and the resume, before any process group exists.

`scaletrain config check`, `scaletrain launch local` (before torchrun starts) and every rank of
`scaletrain train` (before DeepSpeed is imported) run them, so a run that cannot work exits 2
with one line in about a second, and nothing in the run directory has been written.
"""

from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from scaletrain.checkpoint.compat import (
    check_resume,
    data_identities,
    resume_manifest,
    run_identity,
    schedule_note,
)
from scaletrain.checkpoint.lora_base import run_lora_base
from scaletrain.checkpoint.manifest import Manifest, not_a_checkpoint
from scaletrain.config.checks import Resolved, check_config
from scaletrain.config.schema import Config
from scaletrain.data.format import read_metadata
from scaletrain.errors import ConfigError, ScaletrainError
from scaletrain.train.run_dir import locked_folders, probe_holder


@dataclass(frozen=True)
class Checked:
    """What the checks derived: the resolved sizes, and the note on a changed schedule."""

    resolved: Resolved
    schedule_note: str | None = None


def preflight(config: Config, world_size: int, compare: bool = True) -> Checked:
    """Everything `check_config` checks, plus the folders, the data splits and the resume;
    `compare` also compares the checkpoint a resume would start from (see compat.py)."""
    resolved = check_config(config, world_size)
    check_folder(config.train.run_dir, "train.run_dir")
    if config.checkpoint.dir:
        check_folder(config.checkpoint.dir, "checkpoint.dir")
    check_splits(config)
    check_resume_folder(config)
    note = check_resume_compat(config, resolved) if compare else None
    return Checked(resolved, note)


def preflight_launch(config: Config, nproc: int) -> Checked:
    """`launch local`, before torchrun starts: the checks of every rank, and whether another
    live run holds the run directory (read only; rank 0 takes the lock itself)."""
    checked = preflight(config, nproc)
    for field, folder in locked_folders(config).items():
        problem = probe_holder(folder, field)
        if problem:
            raise ScaletrainError(problem)
    return checked


def rank_world_size() -> int:
    """The world size torchrun announced (1 without a launcher), read without importing the
    topology (which loads megatron-core)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def check_folder(path: str, field: str) -> None:
    """The folder is (or can be made) a folder, and a real write into it succeeds: permission
    bits say nothing for root, a read-only mount or a full disk only show on writing."""
    folder = Path(path)
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        what = "is a file" if existing == folder else f"is inside {existing}, which is a file"
        raise ConfigError(field, f"{path} {what}, not a folder; choose a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        where = "" if existing == folder else f" (its nearest existing folder {existing})"
        why = {
            errno.EROFS: "is on a read-only file system",
            errno.EACCES: "is not writable",
            errno.EPERM: "is not writable",
            errno.ENOSPC: "has no space left on device",
        }.get(err.errno or 0, f"cannot be written ({err.strerror})")
        raise ConfigError(field, f"{path}{where} {why}; choose a writable folder") from None


def check_splits(config: Config) -> None:
    """Every data set has at least one training window, and one validation window when the
    run evaluates (TokenDataset would refuse it only after DeepSpeed has started)."""
    window = config.train.seq_len + 1
    needed = {"train": "prepare more data or lower train.seq_len"}
    if config.train.eval_interval > 0:
        needed["val"] = "prepare it with a larger --val-fraction, or set train.eval_interval=0"
    for i, path in enumerate(config.data.paths):
        info = read_metadata(path)
        for split, fix in needed.items():
            tokens = info.splits[split].num_tokens if split in info.splits else 0
            if tokens < window:
                what = "is empty" if tokens == 0 else f"has only {tokens} tokens"
                raise ConfigError(
                    f"data.paths[{i}]",
                    f"the {split} split of {path!r} {what}; one window needs train.seq_len + 1 "
                    f"= {window} tokens; {fix}",
                )


def check_resume_folder(config: Config) -> None:
    """`checkpoint.resume=<folder>` names a checkpoint (a folder with a manifest.json)."""
    resume = config.checkpoint.resume
    if resume in ("auto", "none"):
        return
    if Manifest.read(Path(resume)) is None:
        raise ConfigError("checkpoint.resume", not_a_checkpoint(Path(resume)))


def check_resume_compat(config: Config, resolved: Resolved) -> str | None:
    """Refuse (one line) a resume this config cannot continue; return the schedule note."""
    manifest = resume_manifest(config)
    if manifest is None:
        return None
    current = run_identity(config, resolved, data_identities(config.data.paths))
    check_resume(manifest, config, current)
    run_lora_base(config, manifest)  # a LoRA base checkpoint missing or changed: one line
    return schedule_note(manifest, config)


def resume_summary(config: Config, checked: Checked) -> list[str]:
    """What `config check --run-dir` adds after its ok line: where a resume would start."""
    manifest = resume_manifest(config)
    if manifest is None:
        return [f"resume: nothing to resume in {config.train.run_dir}; training starts at step 0"]
    if config.checkpoint.load_weights_only:
        return [f"resume: the weights of {manifest.folder} fit; training starts at step 0"]
    lines = [f"resume: {manifest.folder} (step {manifest.step}) can be continued"]
    return lines + ([f"warning: {checked.schedule_note}"] if checked.schedule_note else [])
