"""Export folders appear whole or not at all: written beside their place, renamed into it."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A hidden sibling of `out` to write into (not created: `save_pretrained` makes it). When
    the block ends without error it replaces `out` (folder or file) in one rename; it is
    removed in any case, so a failed export leaves `out` as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.{os.getpid()}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        yield partial
        umask_modes(partial)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def umask_modes(folder: Path) -> None:
    """Files as the user's umask makes them (safetensors writes 0600, unreadable to a group
    that serves the model)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~mask)
