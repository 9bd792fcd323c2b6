"""A world of one for the model tests: gloo plus megatron-core's groups, per test module."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from scaletrain.models.parallel import TensorParallel
from scaletrain.topology.dims import ParallelDims
from scaletrain.topology.init import init_topology


@pytest.fixture(scope="module")
def tensor_parallel() -> Iterator[TensorParallel]:
    """TP of one rank, torn down (with the environment init_topology set) after the module."""
    saved = dict(os.environ)
    topology = init_topology(ParallelDims(tp=1, pp=1, dp=1))
    try:
        yield TensorParallel(1, topology.groups.tp)
    finally:
        topology.destroy()
        os.environ.clear()
        os.environ.update(saved)
