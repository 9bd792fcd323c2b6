"""`data prepare --format classify`: csv, jsonl and parquet give the same padded sequences and
labels, a text is cut or padded to --max-length with the eos id, the dataset serves (tokens,
label) rows, and what a classifier cannot use is one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from scaletrain.cli import main
from scaletrain.config.checks import check_config
from scaletrain.config.load import load_config
from scaletrain.data import prepare_dataset, read_metadata
from scaletrain.data.classify import ClassifyDataset
from scaletrain.data.tokenizer import load_tokenizer
from scaletrain.errors import ScaletrainError
from scaletrain.train.classify import classify_dataset, macro_f1
from tests.distributed import TINY

ROWS = [
    {"text": "def f(x):\n    return json.dumps(x)", "label": "json"},
    {"text": "import asyncio\nawait asyncio.sleep(1)", "label": "asyncio"},
    {"text": "x " * 200, "label": "json"},  # longer than --max-length: cut
    {"text": "", "label": "xml"},  # dropped: nothing to classify
    {"text": "from xml.dom import minidom", "label": "xml"},
]


def _write_all(folder: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {"csv": folder / "rows.csv", "jsonl": folder / "rows.jsonl"}
    with files["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(ROWS)
    files["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    files["parquet"] = folder / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), files["parquet"])
    return files


def _prepare(file: Path, out: Path, tokenizer: Path) -> tuple[np.ndarray, np.ndarray]:
    info = prepare_dataset(
        [file],
        out,
        tokenizer=tokenizer,
        val_fraction=0.0,
        num_proc=1,
        fmt="classify",
        max_length=16,
    )
    assert info.kind == "classify" and info.labels == ["asyncio", "json", "xml"]
    data = ClassifyDataset(out, "train", 16)
    rows = np.stack([data[i] for i in range(len(data))])
    return rows[:, :-1], rows[:, -1]


def test_every_table_format_gives_the_same_padded_rows(tmp_path: Path, stdlib_data: Path) -> None:
    tokenizer = stdlib_data / "tokenizer"
    tok = load_tokenizer(tokenizer)
    got = {
        kind: _prepare(file, tmp_path / kind, tokenizer)
        for kind, file in _write_all(tmp_path).items()
    }
    tokens, labels = got["csv"]
    for kind in ("jsonl", "parquet"):
        assert np.array_equal(got[kind][0], tokens) and np.array_equal(got[kind][1], labels)
    kept = [r for r in ROWS if r["text"]]
    names = ["asyncio", "json", "xml"]
    # The split keeps the seed's order: match rows by their label-and-text content.
    want = {
        (names.index(r["label"]), tuple(_padded(tok.encode(r["text"]), 16, tok.eos_id)))
        for r in kept
    }
    assert {(int(y), tuple(x.tolist())) for x, y in zip(tokens, labels, strict=True)} == want
    assert len(labels) == 4
    long_row = tokens[labels == 1][np.argmax((tokens[labels == 1] != tok.eos_id).sum(1))]
    assert (long_row != tok.eos_id).all()  # cut at 16 tokens, no pad left
    # A longer train.seq_len pads further; a shorter one would cut real tokens: refused.
    wide = ClassifyDataset(tmp_path / "csv", "train", 20)[0]
    assert wide.shape == (21,) and (wide[16:20] == tok.eos_id).all()
    with pytest.raises(ScaletrainError, match=r"train.seq_len \(8\) is shorter than the 16"):
        ClassifyDataset(tmp_path / "csv", "train", 8)
    # Prepared without a validation split: a run that evaluates says so in one line.
    config = load_config(TINY, [f"data.paths=[{tmp_path / 'csv'}]", "train.seq_len=16"])
    with pytest.raises(ScaletrainError) as err:
        classify_dataset(config, "val")
    assert str(err.value) == (
        f"split 'val' of '{tmp_path / 'csv'}' has no examples; prepare it with a larger "
        "--val-fraction or set train.eval_interval=0"
    )


def _padded(ids: list[int], length: int, pad: int) -> list[int]:
    ids = ids[:length]
    return ids + [pad] * (length - len(ids))


def test_the_stdlib_task_has_six_labels_and_a_minority(classify_data: Path) -> None:
    info = read_metadata(classify_data)
    assert info.labels == ["asyncio", "email", "json", "multiprocessing", "unittest", "xml"]
    labels = np.concatenate([np.load(classify_data / s.label_file) for s in info.splits.values()])
    assert np.bincount(labels).tolist() == [300, 300, 95, 300, 300, 300]
    assert info.settings["max_length"] == 64


def test_macro_f1_is_scikit_learns() -> None:
    # truth (rows) x prediction (columns); f1 = 2 tp / (truth + predicted) per label:
    # label 0: 6/9, label 1: 4/7; label 2 is only predicted and label 3 only true: both 0.
    confusion = np.array([[3, 1, 0, 0], [2, 2, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]])
    assert macro_f1(confusion) == pytest.approx((6 / 9 + 4 / 7 + 0 + 0) / 4)
    # A label that is neither true nor predicted does not count.
    assert macro_f1(confusion[:3, :3]) == pytest.approx((6 / 9 + 4 / 7) / 2)


def test_what_classify_cannot_use_is_one_line(
    tmp_path: Path, stdlib_data: Path, classify_data: Path, capsys: pytest.CaptureFixture
) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"body": "x", "label": "a"}) + "\n")
    tokenizer = str(stdlib_data / "tokenizer")
    args = ["data", "prepare", "--format", "classify", "--output", str(tmp_path / "out")]
    assert main([*args, "--input", str(rows), "--tokenizer", tokenizer]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"{rows} has no column text (columns: ['body', 'label']); name them with --text-field "
        "and --label-field"
    )
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "x", "label": "a"}) + "\n")
    assert main([*args, "--input", str(one), "--tokenizer", tokenizer]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "--format classify found 1 label(s); it needs at least 2"
    )
    # train.task: classify and labelled data go together, both ways, before anything starts.
    for data, task, kind in (
        (stdlib_data, "classify", "pretrain"),
        (classify_data, "sft", "classify"),
    ):
        config = load_config(TINY, [f"data.paths=[{data}]", f"train.task={task}"])
        with pytest.raises(ScaletrainError) as err:
            check_config(config, world_size=1)
        assert str(err.value) == (
            f"config error: data.paths[0]: '{data}' holds {kind} data and train.task is {task}; "
            "a classifier trains on (only) data prepared with `scaletrain data prepare --format "
            "classify`"
        )
    config = load_config(TINY, [f"data.paths=[{classify_data}]", "train.task=classify"])
    config.parallel.pp = 2
    with pytest.raises(ScaletrainError) as err:
        check_config(config, world_size=2)
    assert str(err.value) == (
        "config error: parallel.pp: (2) > 1 is not supported with train.task: classify (the head "
        "reads the whole model's last hidden states); use tp or dp"
    )


def test_a_classifier_continues_only_a_classifiers_checkpoint(classify_data: Path) -> None:
    from scaletrain.train.classify import check_classify_resume

    config = load_config(TINY, [f"data.paths=[{classify_data}]", "train.task=classify"])
    check_classify_resume({"config": {"train": {"task": "classify"}}}, config)
    with pytest.raises(ScaletrainError) as err:
        check_classify_resume({"config": {"train": {"task": "pretrain"}}}, config)
    assert str(err.value) == (
        "config error: checkpoint.resume: the checkpoint was saved by train.task pretrain, this "
        "run is classify: a classifier's head is not a language model's; start a classifier "
        "from a language model with model.init_from=hf:<its `scaletrain export hf` folder>, or "
        "use checkpoint.resume=none or a new train.run_dir"
    )
    config.train.task = "sft"  # sft and pretrain share the vocabulary head
    check_classify_resume({"config": {"train": {}}}, config)
    with pytest.raises(ScaletrainError, match=r"saved by train\.task classify, this run is sft"):
        check_classify_resume({"config": {"train": {"task": "classify"}}}, config)
