"""Real-world folders: binaries renamed .txt, latin-1 and UTF-16 files, extensionless texts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from scaletrain.cli import main
from scaletrain.data import PreparedInfo, load_tokenizer, prepare, prepare_dataset

SplitDocs = Callable[[Path, PreparedInfo, str], list[np.ndarray]]

LATIN = "Grüße aus Köln, naïve café.\n"  # 28 characters, 5 of them not ASCII


def texts(out: Path, info: PreparedInfo, split_docs: SplitDocs) -> list[str]:
    tok = load_tokenizer(out / "tokenizer")
    docs = split_docs(out, info, "train") + split_docs(out, info, "val")
    return sorted(tok.decode(d[:-1].tolist()) for d in docs)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_binary_skipped_and_invalid_utf8_named_with_its_share(
    tmp_path: Path, split_docs: SplitDocs, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text("plain good text\n")
    (src / "image.txt").write_bytes(bytes(range(256)) * 4)  # a binary renamed .txt
    (src / "utf16.txt").write_bytes("UTF-16 text\n".encode("utf-16"))
    (src / "latin.txt").write_bytes((LATIN * 4).encode("latin-1"))
    with caplog.at_level(logging.WARNING):
        info = prepare_dataset([src], tmp_path / "out", vocab_size=260, num_proc=1)
    assert warnings(caplog) == [
        f"skipped 2 file(s) with NUL bytes (binary, or UTF-16/32 text: then pass --encoding "
        f"utf-16): {src / 'image.txt'}, {src / 'utf16.txt'}",
        # Each of the 5 latin-1 letters is one invalid byte: 20 of 112 characters replaced.
        f"1 file(s) are not valid utf-8; U+FFFD replaced 18% of their characters: "
        f"{src / 'latin.txt'} (18%); if the corpus uses another encoding, pass --encoding "
        "(e.g. latin-1, cp1252)",
    ]
    replaced = (LATIN * 4).replace("ü", "\ufffd").replace("ö", "\ufffd").replace("ï", "\ufffd")
    replaced = replaced.replace("é", "\ufffd").replace("ß", "\ufffd")
    assert texts(tmp_path / "out", info, split_docs) == sorted(["plain good text\n", replaced])
    assert info.inputs["num_files"] == 4  # found; two were skipped when read


def test_encoding_reads_a_known_non_utf8_corpus_exactly(
    tmp_path: Path, split_docs: SplitDocs, caplog: pytest.LogCaptureFixture
) -> None:
    for codec in ("latin-1", "utf-16"):
        src = tmp_path / codec
        src.mkdir()
        (src / "a.txt").write_bytes((LATIN * 3).encode(codec))
        (src / "b.txt").write_bytes("second dürüm file\r\n".encode(codec))
        with caplog.at_level(logging.WARNING):
            out = tmp_path / f"out-{codec}"
            info = prepare_dataset([src], out, vocab_size=260, num_proc=1, encoding=codec)
        assert texts(out, info, split_docs) == sorted([LATIN * 3, "second dürüm file\n"])
        assert info.settings["encoding"] == {"latin-1": "iso8859-1", "utf-16": "utf-16"}[codec]
    assert warnings(caplog) == []
    # jsonl records in latin-1: refused in one line under utf-8, read exactly with --encoding.
    records = tmp_path / "records"
    records.mkdir()
    (records / "r.jsonl").write_bytes(f'{{"text": "{LATIN[:-1]}"}}\n'.encode("latin-1") * 2)
    with pytest.raises(ValueError) as refused:
        prepare_dataset([records], tmp_path / "r-utf8", vocab_size=260, num_proc=1)
    assert str(refused.value) == (
        "a json input holds text that is not valid utf-8 (invalid start byte at byte 2 "
        "of a record); pass --encoding (e.g. latin-1) for such a corpus"
    )
    out = tmp_path / "r-latin"
    info = prepare_dataset([records], out, vocab_size=260, num_proc=1, encoding="latin-1")
    assert texts(out, info, split_docs) == [LATIN[:-1]] * 2
    with pytest.raises(ValueError, match=r"^unknown encoding 'klingon'; use a Python codec name"):
        prepare_dataset([tmp_path / "latin-1"], tmp_path / "x", vocab_size=260, encoding="klingon")


def test_extensionless_files_are_read_and_glob_adds_more(
    tmp_path: Path,
    split_docs: SplitDocs,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # main() would route scaletrain's loggers to this test's stderr for the rest of the session.
    monkeypatch.setattr("scaletrain.logs.setup_logging", lambda: None)
    lic = tmp_path / "licenses"
    lic.mkdir()
    (lic / "LICENSE").write_text("Permission is hereby granted, free of charge.\n")
    (lic / "COPYING").write_text("This program is free software.\n")
    (lic / "NOTICE.rst").write_text("Notice in reStructuredText.\n")
    (lic / "run").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00")  # an extensionless binary
    info = prepare_dataset([lic], tmp_path / "a", vocab_size=260, num_proc=1)
    assert texts(tmp_path / "a", info, split_docs) == [
        "Permission is hereby granted, free of charge.\n",
        "This program is free software.\n",
    ]
    info = prepare_dataset([lic], tmp_path / "b", vocab_size=260, num_proc=1, globs=["*.rst"])
    assert len(texts(tmp_path / "b", info, split_docs)) == 3
    assert info.settings["globs"] == ["*.rst"]

    only_rst = tmp_path / "docs"
    only_rst.mkdir()
    (only_rst / "index.rst").write_text("Welcome\n=======\n")
    args = ["data", "prepare", "--input", str(only_rst), "--output", str(tmp_path / "c")]
    capsys.readouterr()  # drop the progress bars of the runs above
    assert main([*args, "--vocab-size", "260"]) == 2
    assert capsys.readouterr().err == (
        f"no .txt/.py/.md/.jsonl/.json/.parquet or extensionless files found in ['{only_rst}']; "
        "pass --glob PATTERN (e.g. '*.rst', or '*' for every file) to read other files as text\n"
    )
    assert main([*args, "--vocab-size", "260", "--glob", "*.rst", "--num-proc", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"prepared {tmp_path / 'c'}: train ")
    assert [f.name for f in prepare.resolve_inputs([only_rst / "index.rst"], globs=["*"])] == [
        "index.rst"
    ]
    with pytest.raises(ValueError, match=r"or --glob '\*\.rst' to read it as text$"):
        prepare.resolve_inputs([only_rst / "index.rst"])


def test_vocab_size_beyond_the_corpus_says_the_real_size(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a.txt").write_text("tiny corpus, tiny vocabulary\n")
    (tmp_path / "b.txt").write_text("two documents\n")
    with caplog.at_level(logging.WARNING):
        info = prepare_dataset([tmp_path], tmp_path / "out", vocab_size=50_000, num_proc=1)
    assert info.vocab_size < 300
    assert warnings(caplog) == [
        f"vocab_size 50000 is more than this corpus supports: the trained tokenizer has "
        f"{info.vocab_size} tokens (no pair of its training text is left to merge); the data set "
        f"uses {info.vocab_size}"
    ]
