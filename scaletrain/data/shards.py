"""Write encoded splits as shard files plus a document index, and move a finished set into place.

The layout is `format.py`'s. Crash safety lives here: a prepare builds in a private work folder,
moves the parts into the output, and writes metadata.json last, so a killed run never leaves a
folder that looks complete; work folders of killed runs are removed by the next run.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scaletrain.data.format import (
    INDEX_FILE,
    METADATA_FILE,
    SPLITS,
    TOKENIZER_DIR,
    DataError,
    PreparedInfo,
    ShardInfo,
    SplitInfo,
    read_metadata,
)

if TYPE_CHECKING:  # `datasets` costs a second to import; only prepare needs it
    import datasets

logger = logging.getLogger(__name__)

WORK_PREFIX = ".tmp-prepare-"


class ShardWriter:
    """Appends tokens to fixed-size shard files; documents may straddle two shards."""

    def __init__(
        self, folder: Path, rel: str, dtype: np.dtype, max_shard_bytes: int, prefix: str = "shard"
    ) -> None:
        self.folder, self.rel, self.dtype, self.prefix = folder, rel, dtype, prefix
        self.tokens_per_shard = max(1, max_shard_bytes // dtype.itemsize)
        self.shards: list[ShardInfo] = []
        self._file: Any = None
        self._name = ""
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while tokens.size:
            if self._file is None:
                name = f"{self.prefix}_{len(self.shards):05d}.bin"
                self._file = open(self.folder / name, "wb")  # noqa: SIM115 closed in _close
                self._name = name
            part = tokens[: self.tokens_per_shard - self._count]
            part.tofile(self._file)
            self._count += part.size
            tokens = tokens[part.size :]
            if self._count == self.tokens_per_shard:
                self._close()

    def _close(self) -> None:
        self._file.close()
        nbytes = self._count * self.dtype.itemsize
        self.shards.append(ShardInfo(f"{self.rel}/{self._name}", self._count, nbytes))
        self._file, self._count = None, 0

    def finish(self) -> list[ShardInfo]:
        if self._file is not None:
            self._close()
        return self.shards


def write_split(
    ids: datasets.Dataset, work: Path, split: str, dtype: np.dtype, max_shard_bytes: int
) -> SplitInfo:
    """Shards of the split's token stream and its index: one offset per document (not piece)."""
    import pyarrow.compute as pc

    folder = work / split
    folder.mkdir()
    writer = ShardWriter(folder, split, dtype, max_shard_bytes)
    doc_ends = [np.zeros(1, dtype=np.int64)]
    written = 0
    if len(ids):
        for table in ids.with_format("arrow").iter(batch_size=4096):
            ends = table.column("doc_end").to_numpy()
            lengths = [pc.list_value_length(c).to_numpy() for c in table.column("ids").chunks]
            row_ends = written + np.cumsum(np.concatenate(lengths).astype(np.int64))
            doc_ends.append(row_ends[ends])
            for chunk in table.column("ids").chunks:
                writer.write(chunk.flatten().to_numpy(zero_copy_only=False))
            written = int(row_ends[-1])
    shards = writer.finish()
    offsets = np.concatenate(doc_ends)
    np.save(folder / INDEX_FILE, offsets)
    num_tokens = int(offsets[-1])
    assert num_tokens == written == sum(s.num_tokens for s in shards), "shards lost tokens"
    return SplitInfo(
        num_tokens=num_tokens,
        num_documents=len(offsets) - 1,
        shards=shards,
        index_file=f"{split}/{INDEX_FILE}",
    )


def current_dataset(output: Path, fingerprint: str) -> PreparedInfo | None:
    """The existing data set if it was built from the same inputs and is intact, else None."""
    if not (output / METADATA_FILE).is_file():
        return None
    try:
        info = read_metadata(output)
    except DataError:
        return None
    if info.fingerprint != fingerprint:
        return None
    for split in info.splits.values():
        for shard in [*split.shards, *split.mask_shards]:
            f = output / shard.file
            if not f.is_file() or f.stat().st_size != shard.num_bytes:
                return None
    return info


def remove_abandoned_work_dirs(output: Path) -> None:
    """Delete temp folders of killed runs on this host (a live pid may be a concurrent run)."""
    host = socket.gethostname()
    for d in output.glob(f"{WORK_PREFIX}{host}-*"):
        pid = d.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            logger.info("removing %s left by a killed run", d)
            shutil.rmtree(d, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def commit(work: Path, output: Path, info: PreparedInfo) -> None:
    """Move the finished parts into place; metadata.json goes last so only complete sets have it."""
    (output / METADATA_FILE).unlink(missing_ok=True)
    for name in (TOKENIZER_DIR, *SPLITS):
        dst = output / name
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(work / name, dst)
    tmp = work / METADATA_FILE
    info.write(tmp)
    os.replace(tmp, output / METADATA_FILE)
