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
