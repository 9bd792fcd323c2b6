"""Offline checkpoint tools behind `scaletrain ckpt list` and `ckpt verify`.

Both run in one plain process (no torch.distributed) and read only `manifest.json` and the
bytes of each file: nothing is unpickled, so they are safe on a checkpoint from anywhere.
`ckpt consolidate` lives in `consolidate.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from scaletrain.checkpoint.manifest import (
    LATEST,
    MANIFEST,
    STAGING,
    Manifest,
    check_file,
    list_checkpoints,
    read_latest,
    step_of,
)
from scaletrain.errors import ScaletrainError

# manager.py pulls in megatron-core, seconds of imports that `ckpt list` should not pay; nor is
# torch imported here.
CHECKPOINTS = "checkpoints"
COMPLETE = "complete"
INCOMPLETE = "incomplete (not visible)"
CORRUPT = "corrupt"


class CheckpointCorrupt(ScaletrainError):
    """A checkpoint whose files do not match its manifest (exit 1, unlike usage errors)."""

    exit_code = 1


# ---- list and verify ----------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One row of `ckpt list`."""

    tag: str  # `step_00000012`, or `.staging/step_00000014` for a save that never finished
    step: int | None
    bytes: int
    files: int
    layout: str
    saved_at: str
    status: str
    visible: bool

    @property
    def corrupt(self) -> bool:
        return self.visible and self.status != COMPLETE


@dataclass(frozen=True)
class Listing:
    root: Path
    entries: list[Entry]
    latest: str | None  # what the `latest` pointer says, whether or not it exists

    @property
    def corrupt(self) -> list[Entry]:
        return [e for e in self.entries if e.corrupt]

    @property
    def latest_missing(self) -> bool:
        visible = {e.tag for e in self.entries if e.visible}
        return self.latest is not None and self.latest not in visible


def checkpoints_root(path: Path) -> Path:
    """The checkpoint folder of a run: `path` itself, `path/checkpoints`, or the run's
    `checkpoint.dir` from its config.yaml."""
    if not path.is_dir():
        raise ScaletrainError(f"{path}: no such folder")
    if (path / CHECKPOINTS).is_dir():
        return path / CHECKPOINTS
    if path.name == CHECKPOINTS or holds_checkpoints(path):
        return path
    custom = _configured_dir(path / "config.yaml")
    if custom is not None and custom.is_dir():
        return custom
    raise ScaletrainError(
        f"{path}: no checkpoints here; give a run folder or its checkpoints folder"
    )


def holds_checkpoints(path: Path) -> bool:
    """Whether `path` is a checkpoint folder of a run: a `latest` pointer, saves in progress
    or `step_*` folders in it."""
    try:
        if (path / LATEST).is_file() or (path / STAGING).is_dir():
            return True
        return any(p.is_dir() and step_of(p) is not None for p in path.iterdir())
    except OSError:  # missing or not readable: nothing of ours in it
        return False


def _configured_dir(config_file: Path) -> Path | None:
    try:
        config = yaml.safe_load(config_file.read_text())
    except (OSError, yaml.YAMLError):
        return None
    folder = (config or {}).get("checkpoint", {}).get("dir") if isinstance(config, dict) else None
    return Path(folder) if folder else None


def verify_folder(folder: Path) -> str | None:
    """None if every file matches the manifest, else the first problem (one line).

    The single-process twin of `CheckpointManager.verify`, with the same messages.
    """
    manifest = Manifest.read(folder)
    if manifest is None:
        return f"{MANIFEST} is missing or unreadable"
    for entry in manifest.files:
        problem = check_file(folder, entry)
        if problem:
            return problem
    return None


def verify(folder: Path) -> Manifest:
    """The manifest of a checkpoint whose files all check out; CheckpointCorrupt otherwise."""
    if not folder.is_dir():
        raise ScaletrainError(f"{folder}: no such folder")
    if step_of(folder) is None and not (folder / MANIFEST).is_file():
        raise ScaletrainError(
            f"{folder} is not a checkpoint folder; give one step_* folder (see `ckpt list`)"
        )
    problem = verify_folder(folder)
    if problem:
        raise CheckpointCorrupt(f"corrupt: {folder}: {problem}")
    manifest = Manifest.read(folder)
    assert manifest is not None  # verify_folder read it
    return manifest


def describe_layout(data: dict[str, Any]) -> str:
    """`tp2pp1dp2 zero3 bf16` from a manifest."""
    layout = data.get("layout", {})
    text = f"tp{layout.get('tp', '?')}pp{layout.get('pp', '?')}dp{layout.get('dp', '?')}"
    if layout.get("ep", 1) != 1:
        text += f"ep{layout['ep']}"
    return f"{text} zero{layout.get('zero_stage', '?')} {data.get('precision', '?')}"


def list_run(path: Path) -> Listing:
    """Every checkpoint under a run (visible ones verified file by file) and staging leftovers."""
    root = checkpoints_root(path)
    entries = [_visible_entry(folder) for folder in list_checkpoints(root)]
    hidden = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    hidden = [p for p in hidden if not (p / MANIFEST).is_file()]  # not a checkpoint yet
    staging = root / STAGING
    if staging.is_dir():
        hidden += [p for p in staging.iterdir() if p.is_dir() and step_of(p) is not None]
    entries += [_hidden_entry(root, folder) for folder in hidden]
    entries.sort(key=lambda e: (e.step or 0, not e.visible, e.tag))
    return Listing(root, entries, read_latest(root))


def _visible_entry(folder: Path) -> Entry:
    manifest = Manifest.read(folder)
    if manifest is None:
        count, size = _disk_usage(folder)
        problem = f"{MANIFEST} is missing or unreadable"
        return Entry(
            folder.name, step_of(folder), size, count, "-", "-", f"{CORRUPT}: {problem}", True
        )
    problem = verify_folder(folder)
    return Entry(
        tag=folder.name,
        step=manifest.step,
        bytes=manifest.total_bytes,
        files=len(manifest.files),
        layout=describe_layout(manifest.data),
        saved_at=str(manifest.data.get("saved_at", "-")),
        status=f"{CORRUPT}: {problem}" if problem else COMPLETE,
        visible=True,
    )


def _hidden_entry(root: Path, folder: Path) -> Entry:
    count, size = _disk_usage(folder)
    manifest = Manifest.read(folder)  # rank 0 writes it just before the rename
    layout = describe_layout(manifest.data) if manifest else "-"
    return Entry(
        tag=str(folder.relative_to(root)),
        step=step_of(folder),
        bytes=size,
        files=count,
        layout=layout,
        saved_at="-",
        status=INCOMPLETE,
        visible=False,
    )


def _disk_usage(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST]
    return len(files), sum(p.stat().st_size for p in files)


def human_bytes(count: int) -> str:
    if count >= 1e9:
        return f"{count / 1e9:.2f} GB"
    if count >= 1e6:
        return f"{count / 1e6:.1f} MB"
    return f"{count / 1e3:.1f} kB"


def format_listing(listing: Listing) -> list[str]:
    """The `ckpt list` table as aligned lines; `*` marks the checkpoint `latest` points to."""
    if not listing.entries:
        return [f"no checkpoints in {listing.root}"]
    header = ("", "TAG", "STEP", "SIZE", "FILES", "LAYOUT", "SAVED_AT", "STATUS")
    rows = [header]
    for e in listing.entries:
        mark = "*" if e.visible and e.tag == listing.latest else ""
        step = "-" if e.step is None else str(e.step)
        size = human_bytes(e.bytes)
        rows.append((mark, e.tag, step, size, str(e.files), e.layout, e.saved_at, e.status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = {2, 3, 4}  # numbers
    lines = []
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row[:-1])
        ]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    if listing.latest is None:
        lines.append("latest: none")
    else:
        missing = " (missing)" if listing.latest_missing else ""
        lines.append(f"latest: {listing.latest}{missing}")
    return lines
