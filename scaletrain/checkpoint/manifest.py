"""What a checkpoint folder holds and how to prove it is whole.

A checkpoint is `<checkpoints>/step_00000120/` with DeepSpeed's shards, one RNG file per rank
and `manifest.json`, written last, that lists every other file with its size and xxh3-128
checksum. A folder without a manifest is not a checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from scaletrain.logs import get_logger

log = get_logger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"  # file naming the newest complete checkpoint
STAGING = ".staging"  # checkpoints being written, and old ones being deleted
FORMAT_VERSION = 1
STEP_PREFIX = "step_"
_CHUNK = 8 << 20


def tag_for(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith(STEP_PREFIX) or not name[len(STEP_PREFIX) :].isdigit():
        return None
    return int(name[len(STEP_PREFIX) :])


def file_checksum(path: Path) -> str:
    digest = xxhash.xxh3_128()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fsync_file(path)


def describe_file(folder: Path, relative: str) -> dict[str, Any]:
    """Flush one file to disk and record its size and checksum."""
    path = folder / relative
    fsync_file(path)
    return {"path": relative, "bytes": path.stat().st_size, "xxh3_128": file_checksum(path)}


def check_file(folder: Path, entry: dict[str, Any]) -> str | None:
    """None if the file matches its manifest entry, else one line saying what is wrong."""
    path = folder / entry["path"]
    if not path.is_file():
        return f"{entry['path']} is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{entry['path']} has {size} bytes, manifest says {entry['bytes']} (truncated?)"
    if file_checksum(path) != entry["xxh3_128"]:
        return f"{entry['path']} fails its checksum (corrupted)"
    return None


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest.json of one checkpoint."""

    folder: Path
    data: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.data["step"])

    @property
    def files(self) -> list[dict[str, Any]]:
        return self.data["files"]

    @property
    def total_bytes(self) -> int:
        return sum(f["bytes"] for f in self.files)

    @classmethod
    def read(cls, folder: Path) -> Manifest | None:
        """The manifest of `folder`, or None if it has none or an unreadable one."""
        try:
            data = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or "files" not in data or "step" not in data:
            return None
        return cls(folder, data)

    def write(self) -> None:
        path = self.folder / MANIFEST
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        fsync_file(tmp)
        os.replace(tmp, path)


def read_latest(root: Path) -> str | None:
    """The tag the `latest` pointer of `root` names, or None without one.

    A pointer that is not valid UTF-8, is empty or names something other than a folder in
    `root` (e.g. overwritten by another tool) counts as missing, with a warning: the newest
    complete checkpoint is then found by listing the folder.
    """
    pointer = root / LATEST
    try:
        raw = pointer.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        log.warning("%s cannot be read (%s); ignoring it", pointer, err.strerror)
        return None
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        log.warning("%s is not valid UTF-8; ignoring it", pointer)
        return None
    if not tag or "/" in tag or "\\" in tag or tag in (".", ".."):
        log.warning("%s names no checkpoint (%r); ignoring it", pointer, tag[:40])
        return None
    return tag


def not_a_checkpoint(folder: Path) -> str:
    """Why `checkpoint.resume=<folder>` names no checkpoint (the text after the field)."""
    what = (
        "is not a checkpoint (no readable manifest.json)" if folder.exists() else "does not exist"
    )
    return (
        f"{folder} {what}; give a checkpoint folder (e.g. <run_dir>/checkpoints/step_00000120), "
        "auto or none"
    )


def list_checkpoints(root: Path) -> list[Path]:
    """Visible checkpoint folders (step_* with a manifest), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted((p for p in found if (p / MANIFEST).is_file()), key=lambda p: step_of(p) or 0)
