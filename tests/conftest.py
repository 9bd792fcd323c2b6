"""Shared fixtures: a small prepared data set from the standard library (once per session), and
a world of one for in-process model tests (once per test module)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from scaletrain.data import prepare_dataset, stdlib_sources

if TYPE_CHECKING:
    from scaletrain.models.parallel import TensorParallel


@pytest.fixture(scope="session")
def stdlib_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~40 standard-library files tokenized with a 512-token BPE: real text, prepared in seconds."""
    out = tmp_path_factory.mktemp("data") / "stdlib-small"
    prepare_dataset(stdlib_sources()[:40], out, vocab_size=512, val_fraction=0.1, num_proc=1)
    return out


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory: pytest.TempPathFactory, stdlib_data: Path) -> Path:
    """~220 prompt/response pairs from stdlib docstrings (`scaletrain.data.sft_sample`),
    prepared for SFT with the stdlib_data tokenizer in 4 KiB shards (samples cross shards)."""
    from scaletrain.data.sft_sample import write_sample

    folder = tmp_path_factory.mktemp("sft")
    write_sample(folder / "pairs.jsonl", limit_files=150)
    out = folder / "data"
    prepare_dataset(
        [folder / "pairs.jsonl"],
        out,
        tokenizer=stdlib_data / "tokenizer",
        val_fraction=0.1,
        num_proc=1,
        max_shard_bytes=4096,
        fmt="prompt-response",
    )
    return out


@pytest.fixture(scope="session")
def classify_data(tmp_path_factory: pytest.TempPathFactory, stdlib_data: Path) -> Path:
    """~1,600 stdlib source chunks labelled with their package, 6 labels
    (`scaletrain.data.classify_sample`), as a csv prepared with the stdlib_data tokenizer at
    64 tokens per example."""
    from scaletrain.data.classify_sample import write_sample

    folder = tmp_path_factory.mktemp("classify")
    write_sample(folder / "chunks.csv")
    out = folder / "data"
    prepare_dataset(
        [folder / "chunks.csv"],
        out,
        tokenizer=stdlib_data / "tokenizer",
        val_fraction=0.1,
        num_proc=1,
        fmt="classify",
        label_field="package",
        max_length=64,
    )
    return out


@pytest.fixture(scope="module")
def tensor_parallel() -> Iterator[TensorParallel]:
    """TP of one rank (gloo plus megatron-core's groups), torn down with the environment
    init_topology set after the module. Imported here, not above: most tests need no model."""
    from scaletrain.models.parallel import TensorParallel
    from scaletrain.topology.dims import ParallelDims
    from scaletrain.topology.init import init_topology

    saved = dict(os.environ)
    topology = init_topology(ParallelDims(tp=1, pp=1, dp=1))
    try:
        yield TensorParallel(1, topology.groups.tp)
    finally:
        topology.destroy()
        os.environ.clear()
        os.environ.update(saved)
