"""A valid run file and a fake prepared data set in tmp_path, shared by the config tests.

Helpers are handed out as fixtures rather than imported, so these tests work under any pytest
import mode and never clash with another folder's helper module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scaletrain.data.format import FORMAT_VERSION

# Valid for world sizes 1, 2 and 4 with tp 1 or 2: 4 heads, 2 kv heads, global batch 16.
BASE_RUN = """\
model:
  vocab_size: null
  hidden_size: 64
  num_layers: 2
  num_heads: 4
  num_kv_heads: 2
  ffn_hidden_size: 128
  max_seq_len: 256
parallel:
  tp: 1
  dp: null
precision:
  dtype: fp32
optim:
  lr: 3.0e-4
  min_lr: 3.0e-5
  warmup_steps: 10
train:
  micro_batch: 2
  global_batch: 16
  seq_len: 64
  steps: 100
  run_dir: {tmp}/run
data:
  paths: [{tmp}/data]
"""

DATA_VOCAB = 300


def fake_metadata(vocab_size: int, tokens: int = 100_000) -> dict:
    """A prepared data set's metadata.json as `config check` reads it (no shards behind it)."""

    def split(name: str) -> dict:
        index = f"{name}/index.npy"
        return {"num_tokens": tokens, "num_documents": 10, "shards": [], "index_file": index}

    return {
        "format_version": FORMAT_VERSION,
        "dtype": "uint16",
        "vocab_size": vocab_size,
        "eos_id": 0,
        "fingerprint": "fake",
        "tokenizer_file": "tokenizer/tokenizer.json",
        "splits": {"train": split("train"), "val": split("val")},
    }


@pytest.fixture
def run_file(tmp_path: Path) -> Path:
    """tmp_path/run.yaml (the valid base) next to tmp_path/data/metadata.json (vocab 300)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.json").write_text(json.dumps(fake_metadata(DATA_VOCAB)))
    path = tmp_path / "run.yaml"
    path.write_text(BASE_RUN.format(tmp=tmp_path))
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]
