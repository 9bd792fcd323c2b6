"""Disk space and checkpoints: a warning before a save that may not fit, one line when one did
not, and the ranks' agreement on a failed save (so none is left waiting in a collective).

torch.save reports a full disk as `RuntimeError: basic_ios::clear: iostream error` (no errno),
so a failed write counts as "no space left on device" also when, afterwards, the folder's file
system has less room than the save needs.
"""

from __future__ import annotations

import errno
import gc
import shutil
from pathlib import Path

import torch.distributed as dist

from scaletrain.checkpoint.manifest import read_latest
from scaletrain.errors import ScaletrainError

_FULL = (errno.ENOSPC, errno.EDQUOT)
_MIN_ROOM = 1 << 20


class DiskFullError(ScaletrainError):
    """A save ran out of space; the previous checkpoint is intact and still the newest.

    Exit code 1 (the README's "other: a crash; the newest visible checkpoint is intact"):
    unlike a config error (2), training ran and its steps since the last checkpoint are lost."""

    exit_code = 1


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged writer may still use on `folder`'s file system."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def folder_bytes(folder: Path) -> int:
    """What a (partial) checkpoint folder holds so far."""
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def is_disk_full(err: BaseException, folder: Path, needed: int) -> bool:
    """Whether a failed write into `folder` was a full disk (or an exhausted quota)."""
    if isinstance(err, OSError) and err.errno in _FULL:
        return True
    if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
        return True
    return free_bytes(folder) < max(needed, _MIN_ROOM)


def _size(n: int) -> str:
    return f"{n:,} bytes"


def disk_full_message(staging: Path, needed: int | None, written: int, newest: str | None) -> str:
    """The one line every rank prints (after the staging folder was removed)."""
    if needed:
        need = f"needs {_size(needed)} (the size of the last save)"
    else:
        need = f"needs more than the {_size(written)} written before it failed (the first save)"
    kept = f"{newest} is still the newest checkpoint" if newest else "no checkpoint is saved yet"
    return (
        f"checkpoint: no space left on device in {staging}: the save {need} and "
        f"{_size(free_bytes(staging))} are free; the staging folder was removed and {kept}; "
        "free space or set checkpoint.dir"
    )


def space_warning(root: Path, needed: int | None) -> str | None:
    """A warning before a save when the last save's size no longer fits, else None."""
    if not needed:
        return None
    free = free_bytes(root)
    if free >= needed:
        return None
    return (
        f"checkpoint: {_size(free)} free in {root}, the last save took {_size(needed)}: "
        "this save will probably fail; free space or set checkpoint.dir"
    )


def agree_on_failure(
    failure: BaseException | None,
    staging: Path,
    root: Path,
    needed: int | None,
    is_main: bool,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Collective in `group` (an async save's writers have their own): if any rank failed to
    write its part of a save, every rank stops here with the same outcome, after rank 0
    removed the staging folder.

    A full disk is one line on every rank (`DiskFullError`); any other error is re-raised by
    the rank it happened on, and the others name that rank."""
    full = failure is not None and is_disk_full(failure, staging, needed or 0)
    if full:  # its frames hold the half-written file open: its space comes back only when closed
        assert failure is not None
        failure = failure.with_traceback(None)
        failure.__context__ = None
        gc.collect()
    mine = None if failure is None else ("full" if full else repr(failure))
    kinds: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(kinds, mine, group=group)
    if all(kind is None for kind in kinds):
        return
    box: list[str | None] = [None]
    if is_main:
        written = folder_bytes(staging)
        shutil.rmtree(staging, ignore_errors=True)
        box = [disk_full_message(staging, needed, written, read_latest(root))]
    dist.broadcast_object_list(box, src=0, group=group)
    if failure is not None and not full:
        raise failure
    if "full" in kinds:
        raise DiskFullError(box[0] or "checkpoint: no space left on device")
    rank = next(i for i, kind in enumerate(kinds) if kind is not None)
    raise RuntimeError(f"rank {rank} failed while saving {staging.name}: {kinds[rank]}")
