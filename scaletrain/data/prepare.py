"""Turn text, code, jsonl and parquet files into packed token shards that training memory-maps.

Reading and tokenizing go through HF `datasets` (parallel `map`, arrow cache inside the output
folder, never ~/.cache); the result is plain numpy files described in `format.py`. A run whose
inputs and settings are unchanged does nothing, and a killed run never leaves a folder that looks
complete: everything is built in a private temp folder and metadata.json is written last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import sysconfig
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scaletrain.data.format import (
    FORMAT_VERSION,
    INDEX_FILE,
    METADATA_FILE,
    SPLITS,
    TOKENIZER_DIR,
    DataError,
    PreparedInfo,
    ShardInfo,
    SplitInfo,
    read_metadata,
    token_dtype,
)
from scaletrain.data.tokenizer import TOKENIZER_FILE, TextTokenizer, load_tokenizer, train_tokenizer

if TYPE_CHECKING:  # `datasets` costs a second to import; only prepare needs it
    import datasets

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".py", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
MAX_SHARD_BYTES = 256 * 2**20

# Standard-library folders that are tests, data tables or vendored code rather than library code.
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "pydoc_data"}
)
_WORK_PREFIX = ".tmp-prepare-"


def stdlib_sources() -> list[Path]:
    """The default corpus: the running interpreter's standard-library .py files, sorted.

    Tests, idlelib, pydoc's data tables and installed packages are left out: about 10 MB of
    code for CPython 3.11, small enough to prepare in seconds on a laptop.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in root.rglob("*.py"):
        dirs = p.relative_to(root).parts[:-1]
        if _STDLIB_SKIP_DIRS.intersection(dirs) or any(d.startswith("config-") for d in dirs):
            continue
        files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def prepare_dataset(
    inputs: Sequence[str | Path],
    output: str | Path,
    tokenizer: str | Path | None = None,
    vocab_size: int | None = None,
    val_fraction: float = 0.05,
    seed: int = 1234,
    num_proc: int = 2,
    text_field: str = "text",
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> PreparedInfo:
    """Tokenize `inputs` into `output` (see `format.py`) and return its metadata.

    inputs: files, folders (searched recursively for .txt .py .md .jsonl .json .parquet) or globs.
    tokenizer: a folder with tokenizer.json to use; None trains a byte-level BPE of `vocab_size`
        on the training documents.
    val_fraction: share of documents (chosen by `seed`) that go to the "val" split.
    text_field: the column holding the text in jsonl/json/parquet files.
    max_shard_bytes: shard size limit; small values are for tests.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction ({val_fraction}) must be in [0, 1)")
    if num_proc < 1:
        raise DataError(f"num_proc ({num_proc}) must be >= 1")
    if tokenizer is None and vocab_size is None:
        raise DataError("give a tokenizer folder (--tokenizer) or a vocab_size to train one")
    t0 = time.perf_counter()
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    output = Path(output).absolute()
    files = resolve_inputs(inputs, exclude=output)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    if tok is not None and vocab_size is not None and vocab_size != tok.vocab_size:
        logger.warning(
            "vocab_size %d ignored: the given tokenizer has %d tokens", vocab_size, tok.vocab_size
        )
    settings: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "tokenizer": _tokenizer_hash(tok) if tok is not None else None,
        "vocab_size": vocab_size if tok is None else None,
        "val_fraction": val_fraction,
        "seed": seed,
        "text_field": text_field,
        "max_shard_bytes": max_shard_bytes,
    }
    fingerprint = _fingerprint(files, settings)
    output.mkdir(parents=True, exist_ok=True)
    # Several ranks or jobs may prepare the same folder at once: one builds, the others then
    # find it up to date. (filelock falls back to a lock file where flock is unsupported.)
    from filelock import FileLock

    with FileLock(output / ".prepare.lock"):
        current = _current_dataset(output, fingerprint)
        if current is not None:
            logger.info("%s is up to date (fingerprint %.12s); nothing to do", output, fingerprint)
            return current
        _remove_abandoned_work_dirs(output)
        work = output / f"{_WORK_PREFIX}{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            info = _build(files, work, tok, vocab_size, settings, fingerprint, num_proc)
            info = dataclasses.replace(
                info, path=output, inputs={**info.inputs, "args": _describe_args(inputs)}
            )
            _commit(work, output, info)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    train, val = info.splits["train"], info.splits["val"]
    logger.info(
        "prepared %s in %.1fs: %d files (%.1f MB) -> train %d tokens / %d docs, "
        "val %d tokens / %d docs, vocab %d (%s)",
        output,
        time.perf_counter() - t0,
        info.inputs["num_files"],
        info.inputs["num_bytes"] / 1e6,
        train.num_tokens,
        train.num_documents,
        val.num_tokens,
        val.num_documents,
        info.vocab_size,
        info.dtype,
    )
    return info


def _build(
    files: list[Path],
    work: Path,
    tok: TextTokenizer | None,
    vocab_size: int | None,
    settings: dict[str, Any],
    fingerprint: str,
    num_proc: int,
) -> PreparedInfo:
    """Everything except moving into place: read, split, train tokenizer, tokenize, shard."""
    t0 = time.perf_counter()
    docs = _load_documents(files, settings["text_field"], work / "hf_cache")
    logger.info("read %d documents in %.1fs", len(docs), time.perf_counter() - t0)
    if len(docs) == 0:
        raise DataError(f"the {len(files)} input files hold no text (all empty)")
    split_docs = _split_documents(docs, settings["val_fraction"], settings["seed"])
    if tok is None:
        assert vocab_size is not None
        tok = TextTokenizer(train_tokenizer(_iter_texts(split_docs["train"]), vocab_size))
    tok.save(work / TOKENIZER_DIR)
    dtype = token_dtype(tok.vocab_size)
    splits = {}
    for name in SPLITS:
        t1 = time.perf_counter()
        ids = _tokenize(split_docs[name], tok, dtype, num_proc, f"{fingerprint[:16]}-{name}")
        splits[name] = _write_split(ids, work, name, dtype, settings["max_shard_bytes"])
        logger.info(
            "%s: %d tokens in %.1fs", name, splits[name].num_tokens, time.perf_counter() - t1
        )
    return PreparedInfo(
        path=work,
        format_version=FORMAT_VERSION,
        dtype=dtype.name,
        vocab_size=tok.vocab_size,
        eos_id=tok.eos_id,
        fingerprint=fingerprint,
        tokenizer_file=f"{TOKENIZER_DIR}/{TOKENIZER_FILE}",
        splits=splits,
        inputs={"num_files": len(files), "num_bytes": sum(f.stat().st_size for f in files)},
        settings=settings,
    )


def _describe_args(inputs: Sequence[str | Path], keep: int = 10) -> list[str]:
    """The inputs as given, shortened: the stdlib default alone is 700 paths."""
    args = [str(i) for i in inputs]
    if len(args) <= keep:
        return args
    return [*args[:keep], f"... and {len(args) - keep} more"]


def resolve_inputs(inputs: Sequence[str | Path], exclude: Path | None = None) -> list[Path]:
    """Expand files, folders and globs into a sorted, de-duplicated list of supported files.

    Folders are searched recursively, skipping hidden entries and unsupported suffixes; files
    under `exclude` (the output folder) are skipped so a data set never reads itself.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if not inputs:
        raise DataError("no inputs given; pass files, folders or globs")
    found: set[Path] = set()
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            found.update(_walk(path))
        elif path.is_file():
            if path.suffix.lower() not in SUPPORTED_SUFFIXES:
                raise DataError(
                    f"input {text!r} has an unsupported suffix; use {' '.join(SUPPORTED_SUFFIXES)}"
                )
            found.add(path.absolute())
        elif any(c in text for c in "*?["):
            matches = [Path(m) for m in glob.glob(text, recursive=True)]
            if not matches:
                raise DataError(f"input glob {text!r} matches no files")
            for m in matches:
                if m.is_dir():
                    found.update(_walk(m))
                elif m.suffix.lower() in SUPPORTED_SUFFIXES:
                    found.add(m.absolute())
        else:
            raise DataError(f"input {text!r} does not exist")
    if exclude is not None:
        found = {f for f in found if not f.is_relative_to(exclude)}
    if not found:
        raise DataError(
            f"no {'/'.join(SUPPORTED_SUFFIXES)} files found in {[str(i) for i in inputs]}"
        )
    return sorted(found, key=str)


def _walk(folder: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in SUPPORTED_SUFFIXES:
                yield Path(dirpath, name).absolute()


def _fingerprint(files: list[Path], settings: dict[str, Any]) -> str:
    stats = [[str(f), st.st_size, st.st_mtime_ns] for f in files for st in [f.stat()]]
    blob = json.dumps({"files": stats, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _tokenizer_hash(tok: TextTokenizer) -> str:
    return hashlib.sha256((tok.tokenizer.to_str() + tok.eos_token).encode()).hexdigest()


def _current_dataset(output: Path, fingerprint: str) -> PreparedInfo | None:
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
        for shard in split.shards:
            f = output / shard.file
            if not f.is_file() or f.stat().st_size != shard.num_bytes:
                return None
    return info


def _remove_abandoned_work_dirs(output: Path) -> None:
    """Delete temp folders of killed runs on this host (a live pid may be a concurrent run)."""
    host = socket.gethostname()
    for d in output.glob(f"{_WORK_PREFIX}{host}-*"):
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


def _load_documents(files: list[Path], text_field: str, cache_dir: Path) -> datasets.Dataset:
    """One row per document: a whole text/code file, or one record of a jsonl/parquet file."""
    import datasets

    groups: dict[str, list[str]] = {"text": [], "json": [], "parquet": []}
    for f in files:
        kind = _input_kind(f)
        # datasets treats data_files as patterns; escaping keeps names like "a[1].txt" literal.
        groups[kind].append(glob.escape(str(f)))
    parts = []
    for builder, paths in groups.items():
        if not paths:
            continue
        kwargs: dict[str, Any] = {}
        if builder == "text":
            # One bad byte in one file of thousands should not stop a prepare.
            kwargs = {"sample_by": "document", "encoding_errors": "replace"}
        ds = datasets.load_dataset(
            builder, data_files=paths, split="train", cache_dir=str(cache_dir), **kwargs
        )
        field = "text" if builder == "text" else text_field
        if field not in ds.column_names:
            raise DataError(
                f"{builder} inputs have no {field!r} field (columns: {ds.column_names}); "
                "set text_field"
            )
        ds = ds.select_columns([field])
        if field != "text":
            ds = ds.rename_column(field, "text")
        ftype = getattr(ds.features["text"], "dtype", type(ds.features["text"]).__name__)
        if ftype not in ("string", "large_string"):
            raise DataError(f"field {field!r} holds {ftype}, not text; set text_field")
        if ftype == "large_string":  # e.g. parquet from polars; parts must agree to concatenate
            ds = ds.cast_column("text", datasets.Value("string"))
        parts.append(ds)
    docs = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    # Empty documents would only add a lone eos.
    return docs.filter(_nonempty_batch, batched=True, desc="dropping empty documents")


def _input_kind(file: Path) -> str:
    """The `datasets` builder that reads this file."""
    suffix = file.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    return "json" if suffix in JSON_SUFFIXES else "parquet"


def _nonempty_batch(batch: dict[str, list[Any]]) -> list[bool]:
    return [bool(t) for t in batch["text"]]


def _split_documents(
    docs: datasets.Dataset, val_fraction: float, seed: int
) -> dict[str, datasets.Dataset]:
    """Deterministic random split; each split keeps the shuffled order so packing mixes files."""
    n = len(docs)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n > 1:
        n_val = min(max(n_val, 1), n - 1)
    elif val_fraction > 0:
        logger.warning("only one document: the val split stays empty")
    perm = np.random.default_rng(seed).permutation(n)
    return {"train": docs.select(perm[n_val:]), "val": docs.select(perm[:n_val])}


def _iter_texts(docs: datasets.Dataset, batch_size: int = 1000) -> Iterator[str]:
    for batch in docs.iter(batch_size=batch_size):
        yield from batch["text"]


class _EncodeDocuments:
    """The map function: token ids of each document followed by eos (picklable for workers)."""

    def __init__(self, tok: TextTokenizer) -> None:
        self.tok = tok

    def __call__(self, batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        eos = self.tok.eos_id
        return {"ids": [[*ids, eos] for ids in self.tok.encode_batch(batch["text"])]}


@contextlib.contextmanager
def _quiet_forked_tokenizers(active: bool) -> Iterator[None]:
    """Tell forked map workers to tokenize single-threaded, without tokenizers' fork warning.

    Workers already split the work across cores; Rust threads inside each would oversubscribe.
    """
    key = "TOKENIZERS_PARALLELISM"
    if not active or key in os.environ:
        yield
        return
    os.environ[key] = "false"
    try:
        yield
    finally:
        os.environ.pop(key, None)


def _tokenize(
    docs: datasets.Dataset, tok: TextTokenizer, dtype: np.dtype, num_proc: int, fingerprint: str
) -> datasets.Dataset:
    import datasets

    if len(docs) == 0:
        return docs
    procs = min(num_proc, len(docs))
    features = datasets.Features({"ids": datasets.List(datasets.Value(dtype.name))})
    with _quiet_forked_tokenizers(procs > 1):
        return docs.map(
            _EncodeDocuments(tok),
            batched=True,
            batch_size=256,
            num_proc=procs if procs > 1 else None,
            remove_columns=docs.column_names,
            features=features,
            new_fingerprint=fingerprint,  # skips hashing the tokenizer to name the cache file
            desc="tokenizing",
        )


class _ShardWriter:
    """Appends tokens to fixed-size shard files; documents may straddle two shards."""

    def __init__(self, folder: Path, rel: str, dtype: np.dtype, max_shard_bytes: int) -> None:
        self.folder, self.rel, self.dtype = folder, rel, dtype
        self.tokens_per_shard = max(1, max_shard_bytes // dtype.itemsize)
        self.shards: list[ShardInfo] = []
        self._file: Any = None
        self._name = ""
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while tokens.size:
            if self._file is None:
                name = f"shard_{len(self.shards):05d}.bin"
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


def _write_split(
    ids: datasets.Dataset, work: Path, split: str, dtype: np.dtype, max_shard_bytes: int
) -> SplitInfo:
    import pyarrow.compute as pc

    folder = work / split
    folder.mkdir()
    writer = _ShardWriter(folder, split, dtype, max_shard_bytes)
    lengths = [np.zeros(1, dtype=np.int64)]
    if len(ids):
        for table in ids.with_format("arrow").iter(batch_size=4096):
            for chunk in table.column("ids").chunks:
                lengths.append(pc.list_value_length(chunk).to_numpy().astype(np.int64))
                writer.write(chunk.flatten().to_numpy(zero_copy_only=False))
    shards = writer.finish()
    offsets = np.cumsum(np.concatenate(lengths))
    np.save(folder / INDEX_FILE, offsets)
    num_tokens = int(offsets[-1])
    assert num_tokens == sum(s.num_tokens for s in shards), "shards lost tokens"
    return SplitInfo(
        num_tokens=num_tokens,
        num_documents=len(offsets) - 1,
        shards=shards,
        index_file=f"{split}/{INDEX_FILE}",
    )


def _commit(work: Path, output: Path, info: PreparedInfo) -> None:
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
