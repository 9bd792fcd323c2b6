"""Shared fixtures: a small prepared data set from the standard library, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from scaletrain.data import prepare_dataset, stdlib_sources


@pytest.fixture(scope="session")
def stdlib_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~40 standard-library files tokenized with a 512-token BPE: real text, prepared in seconds."""
    out = tmp_path_factory.mktemp("data") / "stdlib-small"
    prepare_dataset(stdlib_sources()[:40], out, vocab_size=512, val_fraction=0.1, num_proc=1)
    return out
