"""On-disk format of a prepared token data set: one place that writes and reads metadata.json.

Layout of a prepared folder (written by `prepare_dataset`, read by `TokenDataset`):

    metadata.json               written last; a folder without it is not a data set
    tokenizer/tokenizer.json    the tokenizer that produced the ids
    <split>/shard_00000.bin     raw little-endian uint16/uint32 token ids, documents back to back,
    <split>/shard_00001.bin     each followed by eos; a document may continue in the next shard
    <split>/index.npy           int64 document start offsets into the split's stream, plus its end
    <split>/mask_00000.bin      kind "sft" only: one uint8 per token, 1 where the token is a
                                response token (a label the loss counts), shards as the tokens'
    <split>/labels.npy          kind "classify" only: int64 label id of each padded sequence
    .prepare.lock               taken while a prepare runs, so concurrent runs do not collide
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scaletrain.errors import ScaletrainError

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = "tokenizer.json"
INDEX_FILE = "index.npy"
SPLITS = ("train", "val")
# What the shards hold: "pretrain" token streams, "sft" ones with a loss mask beside them, or
# "classify" padded sequences with a label each (`classify.py`).
KINDS = ("pretrain", "sft", "classify")


class DataError(ScaletrainError, ValueError):
    """A data problem the user can fix (missing folder, too little data); one line of text.

    It is a ValueError for library callers and a ScaletrainError so the CLI prints one line.
    """


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves disk and page-cache use whenever every id fits in it."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


@dataclass(frozen=True)
class ShardInfo:
    """One shard file of a split."""

    file: str
    """Path relative to the data set folder, e.g. "train/shard_00000.bin"."""
    num_tokens: int
    num_bytes: int


@dataclass(frozen=True)
class SplitInfo:
    """Token and document counts of one split and where its bytes are."""

    num_tokens: int
    num_documents: int
    shards: list[ShardInfo]
    index_file: str
    """Relative path of the int64 document offsets (num_documents + 1 entries)."""
    mask_shards: list[ShardInfo] = field(default_factory=list)
    """Kind "sft": the uint8 loss-mask shards, one per token shard with its token count."""
    label_file: str = ""
    """Kind "classify": relative path of the int64 label ids, one per sequence."""


@dataclass(frozen=True)
class PreparedInfo:
    """Everything metadata.json says about a prepared data set."""

    path: Path
    """The data set folder (not stored in the file, so the folder can be moved)."""
    format_version: int
    dtype: str
    vocab_size: int
    eos_id: int
    fingerprint: str
    """Hash of input paths, sizes, mtimes and settings; equal means re-running is a no-op."""
    tokenizer_file: str
    splits: dict[str, SplitInfo]
    inputs: dict[str, Any] = field(default_factory=dict)
    """Number of input files and bytes, and the input arguments as given."""
    settings: dict[str, Any] = field(default_factory=dict)
    kind: str = "pretrain"
    """One of KINDS; metadata written before kinds existed is "pretrain"."""
    labels: list[str] = field(default_factory=list)
    """Kind "classify": the label names; a label's id is its position."""

    @classmethod
    def written(
        cls,
        work: Path,
        dtype: np.dtype,
        tokenizer: Any,
        fingerprint: str,
        splits: dict[str, SplitInfo],
        files: list[Path],
        settings: dict[str, Any],
        **kind: Any,
    ) -> PreparedInfo:
        """The metadata of a set just written to `work` (every --format): its tokenizer's
        sizes, the input files' count and bytes; `kind` adds the kind and its fields."""
        return cls(
            path=work,
            format_version=FORMAT_VERSION,
            dtype=dtype.name,
            vocab_size=tokenizer.vocab_size,
            eos_id=tokenizer.eos_id,
            fingerprint=fingerprint,
            tokenizer_file=f"{TOKENIZER_DIR}/{TOKENIZER_FILE}",
            splits=splits,
            inputs={"num_files": len(files), "num_bytes": sum(f.stat().st_size for f in files)},
            settings=settings,
            **kind,
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        del d["path"]
        return d

    @classmethod
    def from_json(cls, path: Path, d: dict[str, Any]) -> PreparedInfo:
        splits = {
            name: SplitInfo(
                num_tokens=int(s["num_tokens"]),
                num_documents=int(s["num_documents"]),
                shards=[ShardInfo(**sh) for sh in s["shards"]],
                index_file=s["index_file"],
                mask_shards=[ShardInfo(**sh) for sh in s.get("mask_shards", [])],
                label_file=s.get("label_file", ""),
            )
            for name, s in d["splits"].items()
        }
        fields = {k: v for k, v in d.items() if k != "splits"}
        return cls(path=path, splits=splits, **fields)

    def write(self, file: Path) -> None:
        file.write_text(json.dumps(self.to_json(), indent=2) + "\n")


def read_metadata(path: str | Path) -> PreparedInfo:
    """Read a prepared folder's metadata.json, with a one-line error saying what to do."""
    path = Path(path)
    meta = path / METADATA_FILE
    if not meta.is_file():
        what = "does not exist" if not path.exists() else f"has no {METADATA_FILE}"
        raise DataError(
            f"data set {str(path)!r} {what}; run `scaletrain data prepare --output {path}` first"
        )
    try:
        d = json.loads(meta.read_text())
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise DataError(
                f"data set {str(path)!r} has format version {version}, this code reads "
                f"{FORMAT_VERSION}; prepare it again"
            )
        return PreparedInfo.from_json(path, d)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(
            f"data set {str(path)!r} has an unreadable {METADATA_FILE} ({e}); prepare it again"
        ) from e
