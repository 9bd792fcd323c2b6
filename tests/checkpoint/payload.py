"""An attacker's checkpoint, made as one would: a real checkpoint with a pickled payload planted
into one of its torch files and the manifest's checksums recomputed, so that it verifies.

The payload is what `__reduce__` makes of an object: a call, here `exec` of a line that creates
a marker file. Anything that unpickles the file fully creates the marker; weights-only loading
refuses the global `builtins.exec` instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from scaletrain.checkpoint.manifest import Manifest, describe_file
from scaletrain.checkpoint.safe_load import allow_deepspeed_types

REFUSED_GLOBAL = "exec"  # torch names builtins without their module


class Payload:
    """Unpickles as `exec(<create the marker file>)`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def plant(folder: Path, relative: str, marker: Path) -> Path:
    """Add the payload to `folder/relative` (as an extra top-level entry, so a full unpickle
    runs it and the loaders then ignore it) and make the manifest match again."""
    path = folder / relative
    allow_deepspeed_types()
    state = torch.load(path, map_location="cpu", weights_only=True)  # ours: clean so far
    state["note"] = Payload(marker)
    torch.save(state, path)
    manifest = Manifest.read(folder)
    assert manifest is not None
    manifest.data["files"] = [
        describe_file(folder, entry["path"]) if entry["path"] == relative else entry
        for entry in manifest.files
    ]
    manifest.write()
    return path


def copy_run(source: Path, dest: Path) -> Path:
    """A copy of a run's checkpoints folder (the attacker's starting point)."""
    shutil.copytree(source, dest, symlinks=True)
    return dest
