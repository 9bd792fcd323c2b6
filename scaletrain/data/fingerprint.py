"""Identity of a prepared data set, cheap enough to compute on every rank at start-up.

A resume compares these with the ones recorded in the checkpoint's manifest, so a run cannot
silently continue on other data. What goes in (never more than a few MiB read, whatever the
data set's size):

- metadata.json's description of the tokens (dtype, vocabulary, eos, every split's token and
  document counts, shard names and sizes), without the input arguments or paths, so that a
  moved or re-prepared copy of the same data has the same fingerprint;
- the bytes of the tokenizer (hashed separately as well: `tokenizer_hash`);
- per split, the size of each shard on disk and of the document index, and the first and last
  MiB of the index, of the first shard and of the last shard: two corpora with the same sample
  count still differ there.
"""

from __future__ import annotations

import json
from pathlib import Path

import xxhash

from scaletrain.data.format import PreparedInfo, read_metadata

_SAMPLE = 1 << 20
_IDENTITY_FIELDS = ("format_version", "dtype", "vocab_size", "eos_id")


def tokenizer_hash(info: PreparedInfo) -> str:
    """xxh3-128 of the data set's tokenizer.json (the ids mean nothing without it)."""
    return xxhash.xxh3_128_hexdigest((info.path / info.tokenizer_file).read_bytes())


def dataset_fingerprint(path: str | Path) -> str:
    """xxh3-128 over what identifies the tokens of a prepared folder (see the module text)."""
    info = read_metadata(path)
    digest = xxhash.xxh3_128()
    described = {name: getattr(info, name) for name in _IDENTITY_FIELDS}
    described["splits"] = {
        name: {
            "num_tokens": s.num_tokens,
            "num_documents": s.num_documents,
            "shards": [(sh.file, sh.num_tokens, sh.num_bytes) for sh in s.shards],
        }
        for name, s in sorted(info.splits.items())
    }
    digest.update(json.dumps(described, sort_keys=True).encode())
    digest.update(tokenizer_hash(info).encode())
    for _, split in sorted(info.splits.items()):
        files = [info.path / split.index_file] + [info.path / sh.file for sh in split.shards]
        for file in files:
            digest.update(f"{file.name}:{file.stat().st_size if file.is_file() else -1};".encode())
        for file in dict.fromkeys([files[0], files[min(1, len(files) - 1)], files[-1]]):
            _update_with_ends(digest, file)
    return digest.hexdigest()


def _update_with_ends(digest: xxhash.xxh3_128, file: Path) -> None:
    """Feed the first and last MiB of `file` (all of it when smaller)."""
    if not file.is_file():
        return
    size = file.stat().st_size
    with file.open("rb") as f:
        digest.update(f.read(_SAMPLE))
        if size > 2 * _SAMPLE:
            f.seek(size - _SAMPLE)
            digest.update(f.read(_SAMPLE))
        elif size > _SAMPLE:
            digest.update(f.read())
