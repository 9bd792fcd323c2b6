"""prepare_dataset: shard contents, formats, dtype choice, no-op re-runs and crash safety."""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from scaletrain.data import (
    PreparedInfo,
    TextTokenizer,
    TokenDataset,
    load_tokenizer,
    prepare,
    prepare_dataset,
    shards,
    stdlib_sources,
)
from scaletrain.data.format import token_dtype

SplitDocs = Callable[[Path, PreparedInfo, str], list[np.ndarray]]


def as_read(doc: str) -> str:
    """What the `datasets` text reader yields for a file: universal newlines, like open()."""
    return doc.replace("\r\n", "\n").replace("\r", "\n")


def decoded_docs(path: Path, info: PreparedInfo, split_docs: SplitDocs) -> dict[str, list[str]]:
    tok = load_tokenizer(path / "tokenizer")
    out = {}
    for split in ("train", "val"):
        docs = split_docs(path, info, split)
        assert all(d[-1] == info.eos_id and info.eos_id not in d[:-1] for d in docs)
        out[split] = [tok.decode(d[:-1].tolist()) for d in docs]
    return out


def test_shards_hold_the_tokenized_documents(
    prepared: PreparedInfo, docs: list[str], split_docs: SplitDocs
) -> None:
    path = prepared.path
    got = decoded_docs(path, prepared, split_docs)
    assert len(got["val"]) == 4  # round(20 * 0.2)
    assert len(got["train"]) == 16
    assert sorted(got["train"] + got["val"]) == sorted(as_read(d) for d in docs)
    # Each shard holds at most 64 bytes = 32 uint16 tokens; only the last may be shorter.
    for split in ("train", "val"):
        s = prepared.splits[split]
        assert s.num_documents == len(got[split])
        assert [sh.num_tokens for sh in s.shards[:-1]] == [32] * (len(s.shards) - 1)
        assert sum(sh.num_tokens for sh in s.shards) == s.num_tokens
        for sh in s.shards:
            assert (path / sh.file).stat().st_size == sh.num_bytes == 2 * sh.num_tokens
    assert [sh.file for sh in prepared.splits["train"].shards[:2]] == [
        "train/shard_00000.bin",
        "train/shard_00001.bin",
    ]


def test_metadata_file(prepared: PreparedInfo) -> None:
    meta = json.loads((prepared.path / "metadata.json").read_text())
    assert meta["format_version"] == 1
    assert meta["dtype"] == "uint16"
    assert (meta["vocab_size"], meta["eos_id"]) == (300, 0)
    assert meta["tokenizer_file"] == "tokenizer/tokenizer.json"
    assert meta["inputs"]["num_files"] == 20
    assert meta["splits"]["val"]["num_documents"] == 4
    assert len(meta["fingerprint"]) == 64
    assert (prepared.path / "tokenizer" / "tokenizer.json").is_file()
    assert sorted(p.name for p in prepared.path.iterdir()) == [
        ".prepare.lock",
        "metadata.json",
        "tokenizer",
        "train",
        "val",
    ]


def test_split_is_deterministic_and_seeded(
    tmp_path: Path, corpus_dir: Path, prepared: PreparedInfo, split_docs: SplitDocs
) -> None:
    same = prepare_dataset(
        [corpus_dir], tmp_path / "a", vocab_size=300, val_fraction=0.2, max_shard_bytes=64
    )
    other = prepare_dataset(
        [corpus_dir], tmp_path / "b", vocab_size=300, val_fraction=0.2, seed=7, num_proc=1
    )
    want = decoded_docs(prepared.path, prepared, split_docs)
    # num_proc=2 (the default, parallel map) writes byte-identical shards to num_proc=1.
    for sa, sb in zip(same.splits["train"].shards, prepared.splits["train"].shards, strict=True):
        assert (tmp_path / "a" / sa.file).read_bytes() == (prepared.path / sb.file).read_bytes()
    got = decoded_docs(tmp_path / "b", other, split_docs)
    assert sorted(got["val"]) != sorted(want["val"])
    assert len(got["val"]) == 4


def test_token_dtype_choice() -> None:
    assert token_dtype(300) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    assert token_dtype(200_000) == np.uint32


def test_large_vocab_is_stored_as_uint32(
    tmp_path: Path, corpus_dir: Path, docs: list[str], split_docs: SplitDocs
) -> None:
    # Byte tokens get ids above 65535, so any uint16 truncation would corrupt every document.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0} | {f"<unused_{i}>": i for i in range(1, 70_000)}
    vocab |= {ch: 70_000 + i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    TextTokenizer(tok).save(tmp_path / "big_tok")

    info = prepare_dataset([corpus_dir], tmp_path / "out", tokenizer=tmp_path / "big_tok")
    assert (info.dtype, info.vocab_size) == ("uint32", 70_256)
    got = decoded_docs(tmp_path / "out", info, split_docs)
    assert sorted(got["train"] + got["val"]) == sorted(as_read(d) for d in docs)
    first = split_docs(tmp_path / "out", info, "train")[0]
    assert first.dtype == np.uint32 and first[:-1].min() >= 70_000


def test_rerun_is_a_noop(
    tmp_path: Path, corpus_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    first = prepare_dataset([corpus_dir], out, vocab_size=300, num_proc=1)
    meta = out / "metadata.json"
    mtime = meta.stat().st_mtime_ns
    caplog.clear()  # the first prepare's lines, captured when an earlier test set INFO
    with caplog.at_level(logging.INFO, logger="scaletrain.data.prepare"):
        again = prepare_dataset([corpus_dir], out, vocab_size=300, num_proc=1)
    assert meta.stat().st_mtime_ns == mtime
    assert again == first
    assert [r.getMessage() for r in caplog.records if r.name == "scaletrain.data.prepare"] == [
        f"{out} is up to date (fingerprint {first.fingerprint[:12]}); nothing to do"
    ]
    # A changed setting or a touched input file rebuilds.
    changed = prepare_dataset([corpus_dir], out, vocab_size=290, num_proc=1)
    assert changed.vocab_size == 290 and changed.fingerprint != first.fingerprint
    f = corpus_dir / "doc_000.txt"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    touched = prepare_dataset([corpus_dir], out, vocab_size=290, num_proc=1)
    assert touched.fingerprint != changed.fingerprint


def test_jsonl_parquet_and_text_together(tmp_path: Path, split_docs: SplitDocs) -> None:
    src = tmp_path / "src"
    (src / "nested" / "deeper").mkdir(parents=True)
    records = [{"content": f"json doc {i}: ünïcode ✓", "id": i} for i in range(5)]
    (src / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (src / "nested" / "b.json").write_text(json.dumps([{"content": "json array doc", "id": 9}]))
    # large_string is what polars writes; it must mix with the other files' string columns.
    content = pa.array(["parquet one", "parquet two", ""], type=pa.large_string())
    pq.write_table(
        pa.table({"content": content, "n": [1, 2, 3]}), src / "nested" / "deeper" / "c.parquet"
    )
    (src / "nested" / "d.md").write_text("# markdown doc\n")
    (src / "ignored.csv").write_text("not,read\n")
    (src / ".hidden").mkdir()
    (src / ".hidden" / "e.txt").write_text("hidden file, not read")

    info = prepare_dataset([src], tmp_path / "out", vocab_size=280, text_field="content")
    got = decoded_docs(tmp_path / "out", info, split_docs)
    want = [r["content"] for r in records] + ["json array doc", "parquet one", "parquet two"]
    want.append("# markdown doc\n")
    assert sorted(got["train"] + got["val"]) == sorted(want)  # the empty parquet row is dropped
    assert info.inputs["num_files"] == 4


def test_inputs_by_glob_and_errors(tmp_path: Path, write_docs: Callable[..., list[Path]]) -> None:
    write_docs(tmp_path / "src", ["one\n", "two\n", "three\n"], suffix=".py")
    write_docs(tmp_path / "src", ["not code\n"], suffix=".txt")
    files = prepare.resolve_inputs([str(tmp_path / "src" / "*.py")])
    assert [f.name for f in files] == ["doc_000.py", "doc_001.py", "doc_002.py"]
    with pytest.raises(ValueError, match="matches no files"):
        prepare.resolve_inputs([str(tmp_path / "*.nothing")])
    with pytest.raises(ValueError, match="does not exist"):
        prepare.resolve_inputs([tmp_path / "missing.txt"])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported suffix"):
        prepare.resolve_inputs([tmp_path / "x.csv"])
    with pytest.raises(ValueError, match=r"tokenizer folder .* or a vocab_size"):
        prepare_dataset([tmp_path / "src"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(ValueError, match=r"the 1 input files hold no text \(all empty or skip"):
        prepare_dataset([tmp_path / "empty"], tmp_path / "out", vocab_size=260)
    with pytest.raises(ValueError, match="no 'body' field"):
        (tmp_path / "j.jsonl").write_text('{"text": "x"}\n')
        prepare_dataset([tmp_path / "j.jsonl"], tmp_path / "out", vocab_size=260, text_field="body")


def test_output_inside_input_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha beta gamma\n")
    (tmp_path / "b.txt").write_text("delta epsilon\n")
    first = prepare_dataset([tmp_path], tmp_path / "out", vocab_size=270, num_proc=1)
    again = prepare_dataset([tmp_path], tmp_path / "out", vocab_size=270, num_proc=1)
    assert again.fingerprint == first.fingerprint
    assert first.inputs["num_files"] == 2


def test_failed_prepare_leaves_no_complete_looking_folder(
    tmp_path: Path, corpus_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    prepare_dataset([corpus_dir], out, vocab_size=300, num_proc=1)
    stale = out / f".tmp-prepare-{socket.gethostname()}-999999999"  # no such pid
    stale.mkdir()

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(shards, "commit", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset([corpus_dir], out, vocab_size=290, num_proc=1)
    # The old data set is untouched, the abandoned and the interrupted temp folders are gone.
    names = sorted(p.name for p in out.iterdir())
    assert names == [".prepare.lock", "metadata.json", "tokenizer", "train", "val"]
    assert json.loads((out / "metadata.json").read_text())["vocab_size"] == 300

    monkeypatch.undo()
    real_replace = os.replace
    calls = []

    def replace_then_die(src: str | Path, dst: str | Path) -> None:
        if Path(dst).parent == out:
            calls.append(Path(dst).name)
            if Path(dst).name == "train":  # new tokenizer in place, old splits gone: worst moment
                raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(shards.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset([corpus_dir], out, vocab_size=290, num_proc=1)
    assert calls == ["tokenizer", "train"]
    assert not (out / "metadata.json").exists()
    with pytest.raises(ValueError, match=r"has no metadata\.json; run `scaletrain data prepare"):
        TokenDataset(out, "train", 4)


def test_stdlib_sources() -> None:
    files = stdlib_sources()
    assert files == sorted(files, key=str) and files == stdlib_sources()
    root = Path(os.__file__).parent
    parts = {p for f in files for p in f.relative_to(root).parts[:-1]}
    assert not parts & {"test", "tests", "idlelib", "site-packages", "__pycache__", "pydoc_data"}
    assert {f.suffix for f in files} == {".py"}
    assert root / "os.py" in files and root / "json" / "__init__.py" in files
    assert 5e6 < sum(f.stat().st_size for f in files) < 30e6
