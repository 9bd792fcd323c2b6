"""GlobalBatchSampler: seeded order, DP slicing independent of DP size, exact resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from scaletrain.data import GlobalBatchSampler


def take(sampler: GlobalBatchSampler, steps: int) -> list[list[int]]:
    return [sampler.next_batch().tolist() for _ in range(steps)]


def test_order_is_the_seeded_epoch_permutation() -> None:
    # 20 samples, global batch 6: 3 steps per epoch, samples perm[18:20] are dropped.
    s = GlobalBatchSampler(20, 6, dp_rank=0, dp_size=1, seed=5)
    got = take(s, 7)
    p0 = np.random.default_rng((5, 0)).permutation(20).tolist()
    p1 = np.random.default_rng((5, 1)).permutation(20).tolist()
    p2 = np.random.default_rng((5, 2)).permutation(20).tolist()
    assert got == [p0[0:6], p0[6:12], p0[12:18], p1[0:6], p1[6:12], p1[12:18], p2[0:6]]
    assert s.state_dict() == {
        "epoch": 2,
        "consumed_samples": 42,
        "seed": 5,
        "num_samples": 20,
        "global_batch": 6,
        "shuffle": True,
    }
    assert len(s) == 3


def test_same_seed_same_order_other_seed_other_order() -> None:
    a = take(GlobalBatchSampler(100, 8, 0, 1, seed=1), 20)
    b = take(GlobalBatchSampler(100, 8, 0, 1, seed=1), 20)
    c = take(GlobalBatchSampler(100, 8, 0, 1, seed=2), 20)
    assert a == b
    assert a != c
    assert take(GlobalBatchSampler(10, 5, 0, 1, seed=1, shuffle=False), 3) == [
        [0, 1, 2, 3, 4],
        [5, 6, 7, 8, 9],
        [0, 1, 2, 3, 4],
    ]


@pytest.mark.parametrize("dp_size", [2, 4])
def test_dp_ranks_are_disjoint_and_union_equals_dp1(dp_size: int) -> None:
    steps_per_epoch = 103 // 8
    single = take(GlobalBatchSampler(103, 8, 0, 1, seed=9), steps_per_epoch + 2)
    ranks = [
        take(GlobalBatchSampler(103, 8, r, dp_size, seed=9), steps_per_epoch + 2)
        for r in range(dp_size)
    ]
    for step in range(steps_per_epoch + 2):
        assert all(len(ranks[r][step]) == 8 // dp_size for r in range(dp_size))
        # Rank r holds the r-th slice: concatenated in rank order, this is the DP=1 batch.
        assert list(itertools.chain(*(ranks[r][step] for r in range(dp_size)))) == single[step]
    epoch0 = [i for r in range(dp_size) for step in ranks[r][:steps_per_epoch] for i in step]
    assert len(epoch0) == len(set(epoch0)) == steps_per_epoch * 8


@pytest.mark.parametrize("stop", [2, 3, 4, 7])  # mid-epoch, at, just after, and an epoch later
def test_state_restore_continues_identically(stop: int) -> None:
    reference = take(GlobalBatchSampler(20, 6, 1, 2, seed=3), 12)
    first = GlobalBatchSampler(20, 6, 1, 2, seed=3)
    assert take(first, stop) == reference[:stop]
    state = first.state_dict()
    resumed = GlobalBatchSampler(20, 6, 1, 2, seed=3)
    resumed.load_state_dict(state)
    assert take(resumed, 12 - stop) == reference[stop:]
    # Iteration is the same stream as next_batch.
    again = GlobalBatchSampler(20, 6, 1, 2, seed=3)
    again.load_state_dict(state)
    assert [b.tolist() for b in itertools.islice(again, 12 - stop)] == reference[stop:]


def test_resume_with_another_dp_size() -> None:
    one = GlobalBatchSampler(50, 8, 0, 1, seed=0)
    take(one, 9)
    state = one.state_dict()
    expected = take(one, 3)
    halves = []
    for r in range(2):
        s = GlobalBatchSampler(50, 8, r, 2, seed=0)
        s.load_state_dict(state)
        halves.append(take(s, 3))
    assert [halves[0][i] + halves[1][i] for i in range(3)] == expected


def test_validation() -> None:
    with pytest.raises(ValueError, match=r"global_batch \(6\) must be a positive multiple of"):
        GlobalBatchSampler(100, 6, 0, 4, seed=0)
    with pytest.raises(ValueError, match=r"global_batch \(16\) is larger than the dataset \(10"):
        GlobalBatchSampler(10, 16, 0, 1, seed=0)
    with pytest.raises(ValueError, match=r"dp_rank \(2\) must be in \[0, dp_size \(2\)\)"):
        GlobalBatchSampler(10, 4, 2, 2, seed=0)
    s = GlobalBatchSampler(10, 4, 0, 1, seed=0)
    with pytest.raises(ValueError, match="sampler state has seed=1 but this run has seed=0"):
        s.load_state_dict({"consumed_samples": 4, "seed": 1})
    with pytest.raises(ValueError, match="does not match consumed_samples"):
        s.load_state_dict({"consumed_samples": 4, "epoch": 1})
    with pytest.raises(ValueError, match="not a multiple of global_batch"):
        s.load_state_dict({"consumed_samples": 5})
    assert s.consumed_samples == 0
