"""Sequence-classification data: one token sequence per example, padded to one length, plus a label.

`scaletrain data prepare --format classify --text-field F --label-field L --max-length N` reads
csv, jsonl/json and parquet files (each by its suffix, through `datasets`), encodes each text
with the given tokenizer, cuts it to N tokens and pads it to N with the eos id (which never
occurs inside an encoded text, so the last token that is not the pad is the last real one: the
position `LlamaForSequenceClassification` classifies). Examples with an empty text are dropped.

A split's token shards hold the padded sequences back to back (shards end on a sequence
border), `labels.npy` holds one int64 label id per sequence; metadata.json has kind "classify",
the label names (id = position) and the length in settings["max_length"].
"""

from __future__ import annotations

import glob
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scaletrain.data import shards
from scaletrain.data.format import (
    INDEX_FILE,
    SPLITS,
    TOKENIZER_DIR,
    DataError,
    PreparedInfo,
    SplitInfo,
    read_metadata,
    token_dtype,
)
from scaletrain.data.tokenizer import TextTokenizer

if TYPE_CHECKING:  # `datasets` costs a second to import; only prepare needs it
    import datasets

logger = logging.getLogger(__name__)

FORMAT = "classify"
LABELS_FILE = "labels.npy"
BUILDERS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DEFAULT_MAX_LENGTH = 128


def load_examples(
    files: list[Path], text_field: str, label_field: str, cache_dir: Path
) -> datasets.Dataset:
    """The `text` and `label` columns of every input file, read by its suffix's builder."""
    import datasets

    if not files:
        raise DataError("--format classify found no inputs")
    parts = []
    for file in files:
        builder = BUILDERS.get(file.suffix.lower())
        if builder is None:
            raise DataError(
                f"--format classify reads {'/'.join(BUILDERS)} files; {file} is not one"
            )
        ds = datasets.load_dataset(
            builder, data_files=[glob.escape(str(file))], split="train", cache_dir=str(cache_dir)
        )
        missing = [c for c in (text_field, label_field) if c not in ds.column_names]
        if missing:
            raise DataError(
                f"{file} has no column {', '.join(missing)} (columns: {ds.column_names}); "
                "name them with --text-field and --label-field"
            )
        parts.append(ds.select_columns([text_field, label_field]))
    merged = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return merged.rename_columns({text_field: "text", label_field: "label"})


def label_names(values: list[Any]) -> list[str]:
    """The distinct labels in a stable order: numerically when all are integers, else as text."""
    distinct = set(values)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in distinct):
        return [str(v) for v in sorted(distinct)]
    return sorted({str(v) for v in distinct})


def encode(tok: TextTokenizer, texts: list[str], max_length: int) -> np.ndarray:
    """[len(texts), max_length] ids: each text cut to max_length tokens and padded with eos."""
    out = np.full((len(texts), max_length), tok.eos_id, dtype=np.int64)
    for row, ids in enumerate(tok.encode_batch(texts)):
        ids = ids[:max_length]
        out[row, : len(ids)] = ids
    return out


def build(
    files: list[Path],
    work: Path,
    tok: TextTokenizer,
    settings: dict[str, Any],
    fingerprint: str,
) -> PreparedInfo:
    """Read, encode, split and write the padded sequences and their labels into `work`."""
    max_length = settings["max_length"]
    if max_length < 1:
        raise DataError(f"--max-length ({max_length}) must be >= 1")
    table = load_examples(files, settings["text_field"], settings["label_field"], work / "hf_cache")
    texts = ["" if t is None else str(t) for t in table["text"]]
    raw_labels = table["label"]
    keep = [
        i for i, (t, lab) in enumerate(zip(texts, raw_labels, strict=True)) if t and lab is not None
    ]
    if len(keep) < len(texts):
        logger.warning("dropped %d examples with an empty text or label", len(texts) - len(keep))
    names = label_names([raw_labels[i] for i in keep])
    if len(names) < 2:
        raise DataError(f"--format classify found {len(names)} label(s); it needs at least 2")
    ids = {name: i for i, name in enumerate(names)}
    labels = np.array([ids[str(raw_labels[i])] for i in keep], dtype=np.int64)
    sequences = encode(tok, [texts[i] for i in keep], max_length)
    n = len(keep)
    n_val = (
        0
        if settings["val_fraction"] == 0
        else min(max(round(n * settings["val_fraction"]), 1), n - 1)
    )
    order = np.random.default_rng(settings["seed"]).permutation(n)
    picks = {"train": order[n_val:], "val": order[:n_val]}
    dtype = token_dtype(tok.vocab_size)
    tok.save(work / TOKENIZER_DIR)
    splits = {
        name: _write_split(sequences[picks[name]], labels[picks[name]], work, name, dtype, settings)
        for name in SPLITS
    }
    counts = np.bincount(labels, minlength=len(names))
    logger.info(
        "%d examples, %d labels: %s",
        n,
        len(names),
        ", ".join(f"{name} {c}" for name, c in zip(names, counts.tolist(), strict=True)),
    )
    return PreparedInfo.written(
        work, dtype, tok, fingerprint, splits, files, settings, kind=FORMAT, labels=names
    )


def _write_split(
    sequences: np.ndarray,
    labels: np.ndarray,
    work: Path,
    split: str,
    dtype: np.dtype,
    settings: dict[str, Any],
) -> SplitInfo:
    folder = work / split
    folder.mkdir()
    length = sequences.shape[1]
    # Whole sequences per shard, so that a reader maps each shard as [n, max_length].
    per_shard = max(1, settings["max_shard_bytes"] // (length * dtype.itemsize))
    writer = shards.ShardWriter(folder, split, dtype, per_shard * length * dtype.itemsize)
    writer.write(sequences.reshape(-1))
    np.save(folder / INDEX_FILE, np.arange(len(sequences) + 1, dtype=np.int64) * length)
    np.save(folder / LABELS_FILE, labels)
    return SplitInfo(
        num_tokens=int(sequences.size),
        num_documents=len(sequences),
        shards=writer.finish(),
        index_file=f"{split}/{INDEX_FILE}",
        label_file=f"{split}/{LABELS_FILE}",
    )


class ClassifyDataset:
    """Sample i of a split: its tokens padded to `seq_len` and its label id, [seq_len + 1].

    seq_len may exceed the prepared length (more padding), not undercut it (the cut could drop
    the last real token)."""

    def __init__(self, path: str | Path, split: str, seq_len: int) -> None:
        self.path = Path(path)
        info = read_metadata(self.path)
        if info.kind != FORMAT:
            raise DataError(
                f"data set {str(path)!r} has no labels (kind {info.kind!r}); train.task: classify "
                "reads data prepared with `scaletrain data prepare --format classify`"
            )
        self.length = int(info.settings["max_length"])
        if seq_len < self.length:
            raise DataError(
                f"train.seq_len ({seq_len}) is shorter than the {self.length} tokens {path} was "
                "prepared with (--max-length); set train.seq_len >= it"
            )
        s = info.splits[split]
        self.seq_len, self.pad_id, self.label_names = seq_len, info.eos_id, info.labels
        self.labels = np.load(self.path / s.label_file)
        self._parts = [
            np.memmap(self.path / sh.file, dtype=info.dtype, mode="r").reshape(-1, self.length)
            for sh in s.shards
            if sh.num_tokens
        ]
        self._starts = np.cumsum([0] + [len(p) for p in self._parts])
        if self._starts[-1] != len(self.labels):
            raise DataError(f"split {split!r} of {str(path)!r} is inconsistent; prepare it again")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self.labels):
            raise IndexError(f"example {index} out of range for {len(self.labels)} examples")
        j = int(np.searchsorted(self._starts, index, side="right")) - 1
        out = np.full(self.seq_len + 1, self.pad_id, dtype=np.int64)
        out[: self.length] = self._parts[j][index - self._starts[j]]
        out[-1] = self.labels[index]
        return out


def build_classify_dataset(paths: list[str], split: str, seq_len: int) -> ClassifyDataset:
    """The one prepared classification folder of a run (config checks refuse several)."""
    if len(paths) != 1:
        raise DataError(f"train.task: classify reads one data set; data.paths has {len(paths)}")
    return ClassifyDataset(paths[0], split, seq_len)
