"""TokenDataset windows across shard borders, BlendedDataset proportions, build_dataset."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from scaletrain.data import BlendedDataset, PreparedInfo, TokenDataset, build_dataset


def stream_of(info: PreparedInfo, split: str) -> np.ndarray:
    parts = [np.fromfile(info.path / sh.file, dtype=info.dtype) for sh in info.splits[split].shards]
    return np.concatenate(parts).astype(np.int64)


@pytest.mark.parametrize("seq_len", [1, 7, 31, 32, 33, 100])
def test_windows_match_the_stream(prepared: PreparedInfo, seq_len: int) -> None:
    stream = stream_of(prepared, "train")
    shards = prepared.splits["train"].shards
    assert len(shards) > 5 and {sh.num_tokens for sh in shards[:-1]} == {32}
    ds = TokenDataset(prepared.path, "train", seq_len)
    assert len(ds) == (len(stream) - 1) // seq_len
    for k in range(len(ds)):
        sample = ds[k]
        assert sample.dtype == np.int64 and sample.shape == (seq_len + 1,)
        np.testing.assert_array_equal(sample, stream[k * seq_len : k * seq_len + seq_len + 1])
    np.testing.assert_array_equal(ds[-1], ds[len(ds) - 1])
    np.testing.assert_array_equal(ds[np.int64(1 % len(ds))], ds[1 % len(ds)])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_window_spanning_three_shards(prepared: PreparedInfo) -> None:
    stream = stream_of(prepared, "train")
    ds = TokenDataset(prepared.path, "train", 70)  # 71 tokens touch shards 0, 1 and 2
    np.testing.assert_array_equal(ds[0], stream[:71])
    np.testing.assert_array_equal(ds.tokens(30, 97), stream[30:97])


def test_val_split_and_metadata(prepared: PreparedInfo) -> None:
    ds = TokenDataset(str(prepared.path), "val", 8)
    assert ds.num_tokens == prepared.splits["val"].num_tokens
    assert (ds.vocab_size, ds.eos_id, ds.num_documents) == (300, 0, 4)
    np.testing.assert_array_equal(ds[0], stream_of(prepared, "val")[:9])


def test_pickle_reopens_the_memmaps(prepared: PreparedInfo) -> None:
    ds = TokenDataset(prepared.path, "train", 16)
    blob = pickle.dumps(ds)
    assert len(blob) < 1000  # no token data inside
    clone = pickle.loads(blob)
    assert len(clone) == len(ds)
    np.testing.assert_array_equal(clone[3], ds[3])


def test_errors_name_the_path(prepared: PreparedInfo, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'.*nowhere' does not exist; run `scaletrain data"):
        TokenDataset(tmp_path / "nowhere", "train", 8)
    with pytest.raises(ValueError, match=r"has no metadata\.json"):
        TokenDataset(tmp_path, "train", 8)
    with pytest.raises(ValueError, match="has no split 'test'"):
        TokenDataset(prepared.path, "test", 8)
    n = prepared.splits["val"].num_tokens
    with pytest.raises(ValueError, match=f"split 'val' of .* has {n} tokens, fewer than one"):
        TokenDataset(prepared.path, "val", n)
    assert len(TokenDataset(prepared.path, "val", n - 1)) == 1
    broken = tmp_path / "broken"
    shutil.copytree(prepared.path, broken)
    (broken / prepared.splits["val"].shards[0].file).write_bytes(b"\0\0")
    with pytest.raises(ValueError, match="missing or has the wrong size"):
        TokenDataset(broken, "val", 4)


class Fake:
    """Sample i of fake dataset d is [d, i]."""

    def __init__(self, d: int, n: int) -> None:
        self.d, self.n = d, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        assert 0 <= i < self.n
        return np.array([self.d, i])


def test_blend_follows_the_weights_in_every_prefix() -> None:
    weights = [0.5, 0.3, 0.2]
    blend = BlendedDataset([Fake(0, 50), Fake(1, 30), Fake(2, 20)], weights, seed=3, size=1000)
    assert len(blend) == 1000
    which = np.array([blend[i][0] for i in range(1000)])
    n = np.arange(1, 1001)
    for d, w in enumerate(weights):
        lag = np.cumsum(which == d) - w * n
        assert np.abs(lag).max() <= 1.0
    assert np.bincount(which).tolist() == [500, 300, 200]


def test_blend_uses_each_dataset_as_seeded_permutations() -> None:
    parts = [Fake(0, 50), Fake(1, 30)]
    blend = BlendedDataset(parts, [3, 1], seed=3, size=240)
    samples = np.stack([blend[i] for i in range(240)])
    of0 = samples[samples[:, 0] == 0, 1]
    assert len(of0) == 180
    # 180 uses of a 50-sample dataset: three full passes, each a permutation, then 30 more.
    for p in range(3):
        assert sorted(of0[p * 50 : (p + 1) * 50]) == list(range(50))
    assert len(set(of0[150:])) == 30
    assert not np.array_equal(of0[:50], of0[50:100])

    again = BlendedDataset(parts, [3, 1], seed=3, size=240)
    np.testing.assert_array_equal(np.stack([again[i] for i in range(240)]), samples)
    other = BlendedDataset(parts, [3, 1], seed=4, size=240)
    np.testing.assert_array_equal(other.dataset_index, blend.dataset_index)
    assert not np.array_equal(other.sample_index, blend.sample_index)


def test_blend_defaults_and_errors() -> None:
    blend = BlendedDataset([Fake(0, 10), Fake(1, 6)], [1.0, 1.0], seed=0)
    assert len(blend) == 16
    assert np.bincount(blend.dataset_index).tolist() == [8, 8]
    zero = BlendedDataset([Fake(0, 10), Fake(1, 0)], [1.0, 0.0], seed=0)
    assert zero.dataset_index.tolist() == [0] * 10
    with pytest.raises(ValueError, match="dataset 1 of the blend is empty"):
        BlendedDataset([Fake(0, 10), Fake(1, 0)], [1.0, 1.0], seed=0)
    with pytest.raises(ValueError, match="must be >= 0 with a positive sum"):
        BlendedDataset([Fake(0, 10)], [-1.0], seed=0)
    with pytest.raises(ValueError, match="got 1 weights for 2 datasets"):
        BlendedDataset([Fake(0, 10), Fake(1, 3)], [1.0], seed=0)


def test_build_dataset(prepared: PreparedInfo) -> None:
    one = build_dataset([str(prepared.path)], None, "train", seq_len=8, seed=1)
    assert isinstance(one, TokenDataset) and one.seq_len == 8
    two = build_dataset([prepared.path, prepared.path], [1.0, 3.0], "val", seq_len=8, seed=1)
    assert isinstance(two, BlendedDataset)
    n = len(TokenDataset(prepared.path, "val", 8))
    assert len(two) == 2 * n
    counts = np.bincount(two.dataset_index)
    assert counts.sum() == 2 * n and abs(counts[0] - 2 * n * 0.25) <= 0.5
    np.testing.assert_array_equal(two[0], two.datasets[0][int(two.sample_index[0])])
    with pytest.raises(ValueError, match="got 1 weights for 2 data paths"):
        build_dataset([prepared.path, prepared.path], [1.0], "val", seq_len=8, seed=1)
