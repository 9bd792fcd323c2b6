"""Split the pieces table into train/val documents, train a tokenizer on it and encode it.

Rows are bounded pieces (`pieces.py`); a document is a run of rows whose last has `doc_end`.
The split, the tokenizer training and the index all work on whole documents, so cutting is
invisible downstream: one eos after each document, one index entry per document.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer

from scaletrain.data.pieces import MAX_PIECE_CHARS
from scaletrain.data.tokenizer import TextTokenizer, train_tokenizer

if TYPE_CHECKING:  # `datasets` costs a second to import; only prepare needs it
    import datasets

logger = logging.getLogger(__name__)

# BPE training keeps ~150 bytes per character of text whose words are all distinct; runs
# without spaces (random ids, base64) are exactly that and teach the merges nothing more after
# a few MB, so training reads at most this much of them. Encoding still covers all of it.
MAX_UNBROKEN_TRAINING_CHARS = 4 * 2**20
# Encode at most this many characters per tokenizers call: its per-token records are large.
_ENCODE_CHARS = 2**20


def document_rows(pieces: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(first row, number of rows) of each document."""
    ends = np.flatnonzero(pieces.with_format("numpy")["doc_end"]) + 1
    starts = np.concatenate([[0], ends[:-1]])
    return starts, ends - starts


def _rows_of(docs: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The row indices of documents `docs`, in that order, each document's rows contiguous."""
    n = counts[docs]
    first = np.repeat(starts[docs] - np.concatenate([[0], np.cumsum(n)[:-1]]), n)
    return first + np.arange(int(n.sum()))


def split_documents(
    pieces: datasets.Dataset, val_fraction: float, seed: int
) -> dict[str, datasets.Dataset]:
    """Deterministic random split of documents; each split keeps the shuffled order so packing
    mixes files."""
    starts, counts = document_rows(pieces)
    n = len(starts)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n > 1:
        n_val = min(max(n_val, 1), n - 1)
    elif val_fraction > 0:
        logger.warning("only one document: the val split stays empty")
    perm = np.random.default_rng(seed).permutation(n)
    return {
        "train": pieces.select(_rows_of(perm[n_val:], starts, counts)),
        "val": pieces.select(_rows_of(perm[:n_val], starts, counts)),
    }


def warn_if_cuts_change_ids(tok: TextTokenizer, pieces: datasets.Dataset) -> None:
    """Warn when a given tokenizer encodes text cut at a space unlike the whole text.

    Ours never does (see `pieces.py`); one whose normalizer prepends "▁" to every input does.
    """
    cut = int((document_rows(pieces)[1] > 1).sum())
    if cut and tok.encode("ab cd") != tok.encode("ab") + tok.encode(" cd"):
        logger.warning(
            "this tokenizer encodes text cut at a space differently from the whole text (its "
            "normalizer or pre-tokenizer changes the start of each input): the ids of the %d "
            "document(s) longer than %d characters differ next to the cuts",
            cut,
            MAX_PIECE_CHARS,
        )


class _TrainingTexts:
    """The pieces' texts for the BPE trainer, with at most `limit` characters of unbroken runs."""

    def __init__(self, pieces: datasets.Dataset, limit: int) -> None:
        self.pieces, self.limit = pieces, limit
        self.unbroken = self.skipped = 0

    def __iter__(self) -> Iterator[str]:
        for batch in self.pieces.iter(batch_size=1000):
            for text, unbroken in zip(batch["text"], batch["unbroken"], strict=True):
                if unbroken:
                    if self.unbroken + len(text) > self.limit:
                        self.skipped += len(text)
                        continue
                    self.unbroken += len(text)
                yield text


def train_on_pieces(pieces: datasets.Dataset, vocab_size: int) -> TextTokenizer:
    """Train a byte-level BPE on the training pieces; say so when the corpus gives fewer tokens."""
    texts = _TrainingTexts(pieces, MAX_UNBROKEN_TRAINING_CHARS)
    tok = TextTokenizer(_train_in_thread(texts, vocab_size))
    if texts.skipped:
        logger.info(
            "tokenizer training read %.1f MB of runs without spaces and skipped the other %.1f MB "
            "(they are still tokenized)",
            texts.unbroken / 1e6,
            texts.skipped / 1e6,
        )
    if tok.vocab_size < vocab_size:
        logger.warning(
            "vocab_size %d is more than this corpus supports: the trained tokenizer has %d tokens "
            "(no pair of its training text is left to merge); the data set uses %d",
            vocab_size,
            tok.vocab_size,
            tok.vocab_size,
        )
    return tok


def _train_in_thread(texts: _TrainingTexts, vocab_size: int) -> Tokenizer:
    """Train in a worker thread so that Ctrl-C stops `data prepare` at once.

    Python runs signal handlers in the main thread between bytecodes, and the Rust merge loop
    (GIL released) would hold the main thread for up to a minute on a large corpus.
    """
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["tokenizer"] = train_tokenizer(texts, vocab_size)
        except BaseException as e:  # handed to the main thread
            result["error"] = e

    thread = threading.Thread(target=work, name="bpe-training", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
    if "error" in result:
        raise result["error"]
    return result["tokenizer"]


class _EncodePieces:
    """The map function: each piece's token ids, with eos after a document's last piece
    (picklable for workers)."""

    def __init__(self, tok: TextTokenizer, dtype: np.dtype) -> None:
        self.tok, self.dtype = tok, dtype

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        texts: list[str] = batch["text"]
        ids: list[np.ndarray] = []
        group: list[str] = []
        chars = 0
        for i, text in enumerate(texts):
            group.append(text)
            chars += len(text)
            if chars >= _ENCODE_CHARS or i == len(texts) - 1:
                ids.extend(np.asarray(e, dtype=self.dtype) for e in self.tok.encode_batch(group))
                group, chars = [], 0
        eos = np.asarray([self.tok.eos_id], dtype=self.dtype)
        ends = batch["doc_end"]
        return {
            "ids": [np.concatenate([x, eos]) if e else x for x, e in zip(ids, ends, strict=True)],
            "doc_end": ends,
        }


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


def tokenize(
    pieces: datasets.Dataset, tok: TextTokenizer, dtype: np.dtype, num_proc: int, fingerprint: str
) -> datasets.Dataset:
    """Columns ids (the piece's ids, plus eos at a document's end) and doc_end."""
    import datasets

    if len(pieces) == 0:
        return pieces
    procs = min(num_proc, len(pieces))
    features = datasets.Features(
        {"ids": datasets.List(datasets.Value(dtype.name)), "doc_end": datasets.Value("bool")}
    )
    with _quiet_forked_tokenizers(procs > 1):
        return pieces.map(
            _EncodePieces(tok, dtype),
            batched=True,
            batch_size=256,
            num_proc=procs if procs > 1 else None,
            remove_columns=pieces.column_names,
            features=features,
            new_fingerprint=fingerprint,  # skips hashing the tokenizer to name the cache file
            desc="tokenizing",
        )
