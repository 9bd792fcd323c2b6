"""Turn text, code, jsonl and parquet files into packed token shards that training memory-maps.

The steps live in their own modules: `sources` finds and reads the inputs into bounded document
pieces, `tokenizing` splits, trains a tokenizer and encodes (HF `datasets` parallel `map`, arrow
cache inside the output folder, never ~/.cache), `shards` writes the numpy files described in
`format.py` and moves them into place. A run whose inputs and settings are unchanged does
nothing, and a killed or interrupted run never leaves a folder that looks complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scaletrain.data import classify, sft, shards, sources, tokenizing
from scaletrain.data.format import (
    FORMAT_VERSION,
    SPLITS,
    TOKENIZER_DIR,
    DataError,
    PreparedInfo,
    token_dtype,
)
from scaletrain.data.pieces import MAX_PIECE_CHARS
from scaletrain.data.sources import resolve_inputs, stdlib_sources
from scaletrain.data.tokenizer import TextTokenizer, load_tokenizer

__all__ = ["MAX_SHARD_BYTES", "prepare_dataset", "resolve_inputs", "stdlib_sources"]

logger = logging.getLogger(__name__)

MAX_SHARD_BYTES = 256 * 2**20


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
    encoding: str = "utf-8",
    globs: Sequence[str] = (),
    fmt: str = "text",
    label_field: str = "label",
    max_length: int = classify.DEFAULT_MAX_LENGTH,
) -> PreparedInfo:
    """Tokenize `inputs` into `output` (see `format.py`) and return its metadata.

    inputs: files, folders (searched recursively for .txt .py .md .jsonl .json .parquet and
        files without an extension) or globs.
    tokenizer: a folder with tokenizer.json to use; None trains a byte-level BPE of `vocab_size`
        on the training documents.
    val_fraction: share of documents (chosen by `seed`) that go to the "val" split.
    text_field: the column holding the text in jsonl/json/parquet files.
    max_shard_bytes: shard size limit; small values are for tests.
    encoding: codec of the text (and json) files; files not valid in it are named in a warning.
    globs: file-name patterns (e.g. "*.rst") of further files in folders to read as text.
    fmt: "text" for pretraining; "chat" or "prompt-response" for SFT records with a loss mask
        (`sft.py`), which need the `tokenizer` of the model they fine-tune; "classify" for
        labelled texts (csv too) cut and padded to `max_length` tokens (`classify.py`).
    label_field: the label column of "classify" inputs.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction ({val_fraction}) must be in [0, 1)")
    if num_proc < 1:
        raise DataError(f"num_proc ({num_proc}) must be >= 1")
    if tokenizer is None and vocab_size is None:
        raise DataError("give a tokenizer folder (--tokenizer) or a vocab_size to train one")
    if fmt != "text" and tokenizer is None:
        raise DataError(
            f"--format {fmt} needs --tokenizer DIR: the tokenizer of the model it fine-tunes"
        )
    encoding = sources.check_encoding(encoding)
    t0 = time.perf_counter()
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    output = Path(output).absolute()
    if fmt == classify.FORMAT:  # csv files are tables here, not text
        globs = [*globs, "*.csv"]
    files = resolve_inputs(inputs, exclude=output, globs=globs)
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
        "encoding": encoding,
        "globs": list(globs),
        "max_piece_chars": MAX_PIECE_CHARS,
    }
    if fmt != "text":  # pretraining settings (and so their fingerprints) stay as they were
        settings["format"] = fmt
        assert tokenizer is not None
        if fmt == classify.FORMAT:
            settings.update(label_field=label_field, max_length=max_length)
        else:
            settings["chat_template"] = sft.template_hash(tokenizer)
    fingerprint = _fingerprint(files, settings)
    output.mkdir(parents=True, exist_ok=True)
    # Several ranks or jobs may prepare the same folder at once: one builds, the others then
    # find it up to date. (filelock falls back to a lock file where flock is unsupported.)
    from filelock import FileLock

    with FileLock(output / ".prepare.lock"):
        current = shards.current_dataset(output, fingerprint)
        if current is not None:
            logger.info("%s is up to date (fingerprint %.12s); nothing to do", output, fingerprint)
            return current
        shards.remove_abandoned_work_dirs(output)
        work = output / f"{shards.WORK_PREFIX}{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            if fmt == "text":
                info = _build(files, work, tok, vocab_size, settings, fingerprint, num_proc)
            elif fmt == classify.FORMAT:
                assert tok is not None
                info = classify.build(files, work, tok, settings, fingerprint)
            else:
                assert tok is not None and tokenizer is not None
                info = sft.build(files, work, tok, tokenizer, settings, fingerprint, num_proc)
            info = dataclasses.replace(
                info, path=output, inputs={**info.inputs, "args": _describe_args(inputs)}
            )
            shards.commit(work, output, info)
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
    pieces = sources.load_pieces(
        files, settings["text_field"], settings["encoding"], work / "hf_cache"
    )
    logger.info("read %d document pieces in %.1fs", len(pieces), time.perf_counter() - t0)
    split_pieces = tokenizing.split_documents(pieces, settings["val_fraction"], settings["seed"])
    if tok is None:
        assert vocab_size is not None
        tok = tokenizing.train_on_pieces(split_pieces["train"], vocab_size)
    else:
        tokenizing.warn_if_cuts_change_ids(tok, pieces)
    tok.save(work / TOKENIZER_DIR)
    dtype = token_dtype(tok.vocab_size)
    splits = {}
    for name in SPLITS:
        t1 = time.perf_counter()
        ids = tokenizing.tokenize(
            split_pieces[name], tok, dtype, num_proc, f"{fingerprint[:16]}-{name}"
        )
        splits[name] = shards.write_split(ids, work, name, dtype, settings["max_shard_bytes"])
        logger.info(
            "%s: %d tokens in %.1fs", name, splits[name].num_tokens, time.perf_counter() - t1
        )
    return PreparedInfo.written(work, dtype, tok, fingerprint, splits, files, settings)


def _describe_args(inputs: Sequence[str | Path], keep: int = 10) -> list[str]:
    """The inputs as given, shortened: the stdlib default alone is 700 paths."""
    args = [str(i) for i in inputs]
    if len(args) <= keep:
        return args
    return [*args[:keep], f"... and {len(args) - keep} more"]


def _fingerprint(files: list[Path], settings: dict[str, Any]) -> str:
    stats = [[str(f), st.st_size, st.st_mtime_ns] for f in files for st in [f.stat()]]
    blob = json.dumps({"files": stats, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _tokenizer_hash(tok: TextTokenizer) -> str:
    return hashlib.sha256((tok.tokenizer.to_str() + tok.eos_token).encode()).hexdigest()
