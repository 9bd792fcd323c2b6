"""Long documents are cut into bounded pieces without changing the ids of normal documents.

The two digests below were computed with the code before cutting existed (prepare.py of
commit e6708a4, which fed whole documents to the trainer and the encoder): equal digests mean
byte-identical shards, index and tokenizer.json.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, normalizers

from scaletrain.data import PreparedInfo, load_tokenizer, prepare_dataset, train_tokenizer
from scaletrain.data import tokenizing as tokenizing_module
from scaletrain.data.pieces import MAX_PIECE_CHARS, RUN_PIECE_CHARS, cut_document
from scaletrain.data.tokenizer import TextTokenizer

SplitDocs = Callable[[Path, PreparedInfo, str], list[np.ndarray]]

BEFORE_CUTTING_CONFTEST = "a2f762b61183dcabb16b32ab6c9b96d1a63b16421d4042e8fc1b8282285620f7"
BEFORE_CUTTING_SYNTHETIC = "f8e75085bf4b24e0d78746b6d21c5a2220624aadf7cae22422333d2b7030e21a"

# One string reads better than 38 one-line list items.
_WORDS = (  # noqa: SIM905
    "the of and to in is for def return self import class None True value data "
    "über café naïve 日本語 ключ λ x1 y_2 3.14 1000 (a, b) [i] {k: v} == != -> # ' \" ;"
).split()
_SEPS = [" "] * 12 + ["\n", "\n    ", "  ", "\t", "\r\n", ", ", ". "]


def synthetic_docs(seed: int = 0) -> list[str]:
    """16 documents of 1.5-9 KB and three of 133-266 K characters: code-like prose, unicode,
    tabs, CRLF, runs of spaces; no run without spaces longer than a few characters."""
    rng = random.Random(seed)

    def doc(n_words: int) -> str:
        return "".join(rng.choice(_WORDS) + rng.choice(_SEPS) for _ in range(n_words))

    return [doc(rng.randint(20, 2000)) for _ in range(16)] + [doc(n) for n in (30000, 45000, 60000)]


def digest(info: PreparedInfo) -> str:
    h = hashlib.sha256()
    for split in ("train", "val"):
        s = info.splits[split]
        for sh in s.shards:
            h.update((info.path / sh.file).read_bytes())
        h.update((info.path / s.index_file).read_bytes())
    h.update((info.path / "tokenizer" / "tokenizer.json").read_bytes())
    return h.hexdigest()


def test_ids_of_normal_documents_are_those_from_before_cutting(
    prepared: PreparedInfo, tmp_path: Path
) -> None:
    assert digest(prepared) == BEFORE_CUTTING_CONFTEST
    src = tmp_path / "src"
    src.mkdir()
    docs = synthetic_docs()
    assert sum(len(d) > MAX_PIECE_CHARS for d in docs) == 3  # these three are cut
    for i, d in enumerate(docs):
        (src / f"d{i:02d}.txt").write_bytes(d.encode())
    info = prepare_dataset([src], tmp_path / "out", vocab_size=600, val_fraction=0.2, num_proc=1)
    assert digest(info) == BEFORE_CUTTING_SYNTHETIC
    assert (info.splits["train"].num_tokens, info.splits["val"].num_tokens) == (106369, 156931)


def test_cuts_fall_where_encoding_the_pieces_equals_encoding_the_whole() -> None:
    text = "".join(synthetic_docs(seed=3)[16:]).replace("\r\n", "\n")
    pieces = cut_document(text)
    assert "".join(p.text for p in pieces) == text
    assert len(pieces) > 6 and max(len(p.text) for p in pieces) <= MAX_PIECE_CHARS
    assert [p.doc_end for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert not any(p.unbroken for p in pieces)
    tok = TextTokenizer(train_tokenizer([text[:200_000]], vocab_size=800))
    joined = [i for p in pieces for i in tok.encode(p.text)]
    assert joined == tok.encode(text)
    # A document that fits is never cut, whatever it holds.
    assert cut_document("x" * MAX_PIECE_CHARS) == [("x" * MAX_PIECE_CHARS, True, False)]


def test_runs_without_spaces_are_cut_into_short_pieces() -> None:
    run = "".join(random.Random(1).choices("abcdefghijklmnopqrstuvwxyz", k=100_000))
    text = "prose before the run " * 50 + run + " and prose after it" * 4000
    pieces = cut_document(text)
    assert "".join(p.text for p in pieces) == text
    unbroken = [p.text for p in pieces if p.unbroken]
    assert "".join(unbroken) == run
    assert [len(u) for u in unbroken] == [RUN_PIECE_CHARS] * 97 + [100_000 - 97 * RUN_PIECE_CHARS]
    assert max(len(p.text) for p in pieces) <= MAX_PIECE_CHARS


def test_long_document_decodes_exactly_and_stays_one_document(
    tmp_path: Path,
    split_docs: SplitDocs,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = random.Random(2)
    run = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789+/=", k=300_000))
    long_doc = "Grüße — " + " ".join(synthetic_docs(seed=5)[:8]) + run + "\ttail ✓\n"
    (tmp_path / "long.txt").write_text(long_doc)
    (tmp_path / "short.txt").write_text("a short document\n")
    # Training reads only the first 100 000 characters of unbroken runs (4 MiB by default).
    monkeypatch.setattr(tokenizing_module, "MAX_UNBROKEN_TRAINING_CHARS", 100_000)
    with caplog.at_level(logging.INFO, logger="scaletrain.data.tokenizing"):
        info = prepare_dataset([tmp_path], tmp_path / "out", vocab_size=500, val_fraction=0.0)
    assert info.splits["train"].num_documents == 2
    tok = load_tokenizer(tmp_path / "out" / "tokenizer")
    docs = split_docs(tmp_path / "out", info, "train")
    texts = sorted(tok.decode(d[:-1].tolist()) for d in docs)
    assert texts == sorted([long_doc.replace("\r\n", "\n"), "a short document\n"])
    assert all(d[-1] == info.eos_id and info.eos_id not in d[:-1] for d in docs)
    assert [r.getMessage() for r in caplog.records if "runs without spaces" in r.getMessage()] == [
        "tokenizer training read 0.1 MB of runs without spaces and skipped the other 0.2 MB "
        "(they are still tokenized)"
    ]


def test_a_given_tokenizer_that_changes_cut_ids_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "long.txt").write_text(" ".join(synthetic_docs(seed=7)[16:17]))  # 133 K characters
    (src / "short.txt").write_text("short one\n")
    ours = TextTokenizer(train_tokenizer(["short one", "long text"], vocab_size=260))
    ours.save(tmp_path / "ours")
    prepending = Tokenizer.from_str(ours.tokenizer.to_str())
    prepending.normalizer = normalizers.Prepend("▁")  # as sentencepiece-style tokenizers do
    TextTokenizer(prepending).save(tmp_path / "prepending")
    with caplog.at_level(logging.WARNING):
        prepare_dataset([src], tmp_path / "a", tokenizer=tmp_path / "ours", num_proc=1)
        assert warnings_of(caplog) == []
        prepare_dataset([src], tmp_path / "b", tokenizer=tmp_path / "prepending", num_proc=1)
    assert warnings_of(caplog) == [
        "this tokenizer encodes text cut at a space differently from the whole text (its "
        "normalizer or pre-tokenizer changes the start of each input): the ids of the 1 "
        "document(s) longer than 65536 characters differ next to the cuts"
    ]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
