"""Activation checkpointing recomputes blocks in backward without changing a single bit.

The tiny config (2 blocks, fp32, deterministic) runs 6 steps; `full` and `every_n` (every=2:
block 0 only) must give exactly the losses and gradient norms of `none`, on one rank and with
the megatron-core layers split over TP=2.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed import train

pytestmark = pytest.mark.slow

KEYS = ("step", "loss", "grad_norm", "val_loss")


def _values(metrics: list[dict]) -> list[tuple]:
    return [tuple(m.get(key) for key in KEYS) for m in metrics]


@pytest.fixture(scope="module")
def plain(stdlib_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return train(1, tmp_path_factory.mktemp("none"), stdlib_data)


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.activation_checkpointing=full",),
        ("model.activation_checkpointing=every_n", "model.activation_checkpointing_every=2"),
    ],
    ids=["full", "every_n"],
)
def test_checkpointing_is_bit_identical_on_one_rank(
    overrides: tuple[str, ...], stdlib_data: Path, tmp_path: Path, plain: list[dict]
) -> None:
    got = train(1, tmp_path, stdlib_data, *overrides)
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5, 6]
    assert _values(got) == _values(plain)


def test_full_checkpointing_is_bit_identical_with_tp2(stdlib_data: Path, tmp_path: Path) -> None:
    none = train(2, tmp_path / "none", stdlib_data, "parallel.tp=2")
    full = train(
        2, tmp_path / "full", stdlib_data, "parallel.tp=2", "model.activation_checkpointing=full"
    )
    assert _values(full) == _values(none)
