"""ParallelDims: derived degrees, the rank layout as data, and agreement with megatron-core."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scaletrain.errors import ConfigError
from scaletrain.topology.dims import AXES, ParallelDims

HERE = Path(__file__).resolve().parent


def test_resolve_derives_dp() -> None:
    dims = ParallelDims.resolve(tp=2, pp=2, dp=None, ep=1, world_size=8)
    assert dims == ParallelDims(tp=2, pp=2, dp=2, ep=1)
    assert dims.world_size == 8
    assert dims.describe() == "tp2pp2dp2"


def test_resolve_accepts_matching_dp_and_ep() -> None:
    dims = ParallelDims.resolve(tp=1, pp=1, dp=4, ep=2, world_size=4)
    assert dims == ParallelDims(tp=1, pp=1, dp=4, ep=2)
    assert dims.describe() == "tp1pp1dp4ep2"


def test_world_8_tp2_dp2_pp2_layout() -> None:
    """Written out by hand: tp neighbours are adjacent ranks, pp is the slowest index."""
    dims = ParallelDims.resolve(tp=2, pp=2, dp=None, ep=1, world_size=8)
    assert dims.grid().tolist() == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    assert [dims.coords(rank) for rank in range(8)] == [
        {"pp": 0, "dp": 0, "tp": 0},
        {"pp": 0, "dp": 0, "tp": 1},
        {"pp": 0, "dp": 1, "tp": 0},
        {"pp": 0, "dp": 1, "tp": 1},
        {"pp": 1, "dp": 0, "tp": 0},
        {"pp": 1, "dp": 0, "tp": 1},
        {"pp": 1, "dp": 1, "tp": 0},
        {"pp": 1, "dp": 1, "tp": 1},
    ]
    assert dims.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dims.groups("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert dims.model_parallel_groups() == [[0, 1, 4, 5], [2, 3, 6, 7]]


LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 1, 4), (2, 1, 2), (2, 2, 1), (1, 2, 2), (2, 2, 2), (4, 2, 3)]


@pytest.mark.parametrize(("tp", "pp", "dp"), LAYOUTS)
def test_every_rank_in_one_group_per_axis(tp: int, pp: int, dp: int) -> None:
    dims = ParallelDims(tp=tp, pp=pp, dp=dp)
    world = range(dims.world_size)
    sizes = {"tp": tp, "pp": pp, "dp": dp}
    for axis in AXES:
        groups = dims.groups(axis)
        assert sorted(r for g in groups for r in g) == list(world), axis
        assert all(len(g) == sizes[axis] for g in groups), axis
        assert len(groups) == dims.world_size // sizes[axis], axis
    model = dims.model_parallel_groups()
    assert sorted(r for g in model for r in g) == list(world)
    assert all(len(g) == tp * pp for g in model)


@pytest.mark.parametrize(("tp", "pp", "dp"), LAYOUTS)
def test_coords_index_the_groups(tp: int, pp: int, dp: int) -> None:
    """A rank's group along an axis is the one whose other coordinates equal the rank's."""
    dims = ParallelDims(tp=tp, pp=pp, dp=dp)
    for rank in range(dims.world_size):
        coords = dims.coords(rank)
        assert int(dims.grid()[coords["pp"], coords["dp"], coords["tp"]]) == rank
        for axis in AXES:
            (group,) = [g for g in dims.groups(axis) if rank in g]
            assert group.index(rank) == coords[axis]
            others = {a: coords[a] for a in AXES if a != axis}
            assert all({a: dims.coords(r)[a] for a in others} == others for r in group), (
                rank,
                axis,
            )


@pytest.mark.parametrize(
    ("tp", "pp", "dp", "ep", "world", "expected"),
    [
        (0, 1, None, 1, 4, "config error: parallel.tp: must be >= 1, got 0"),
        (1, 0, None, 1, 4, "config error: parallel.pp: must be >= 1, got 0"),
        (1, 1, None, 0, 4, "config error: parallel.ep: must be >= 1, got 0"),
        (1, 1, None, 1, 0, "config error: world_size: must be >= 1, got 0"),
        (1, 1, 0, 1, 4, "config error: parallel.dp: must be >= 1 or null, got 0"),
        (
            4,
            1,
            None,
            1,
            6,
            "config error: parallel: world size (6) is not divisible by tp (4) * pp (1); "
            "change tp/pp or the number of ranks",
        ),
        (
            2,
            2,
            3,
            1,
            8,
            "config error: parallel: tp (2) * pp (2) * dp (3) = 12 must equal the world size "
            "(8); set parallel.dp=null to derive dp",
        ),
        (
            1,
            2,
            None,
            4,
            12,
            "config error: parallel.ep: expert_parallel (4) must divide data_parallel (6)",
        ),
    ],
)
def test_resolve_errors(
    tp: int, pp: int, dp: int | None, ep: int, world: int, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        ParallelDims.resolve(tp=tp, pp=pp, dp=dp, ep=ep, world_size=world)
    assert str(info.value) == expected


@pytest.fixture(scope="module")
def megatron_groups(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """megatron-core's groups on 4 gloo ranks for tp2pp2dp1, tp2pp1dp2 and tp1pp2dp2."""
    out = tmp_path_factory.mktemp("megatron") / "groups.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(HERE / "megatron_groups.py"), str(out), "4", "2x2", "2x1", "1x2"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize(("tp", "pp"), [(2, 2), (2, 1), (1, 2)])
def test_layout_matches_megatron_core(
    megatron_groups: dict[str, list[dict]], tp: int, pp: int
) -> None:
    dims = ParallelDims.resolve(tp=tp, pp=pp, dp=None, ep=1, world_size=4)
    per_rank = megatron_groups[f"{tp}x{pp}"]
    assert len(per_rank) == 4
    for rank, theirs in enumerate(per_rank):
        ours = {axis: next(g for g in dims.groups(axis) if rank in g) for axis in AXES}
        ours["model"] = next(g for g in dims.model_parallel_groups() if rank in g)
        assert {k: theirs[k] for k in ours} == ours, f"rank {rank}"
