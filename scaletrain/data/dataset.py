"""Training samples from prepared token shards: fixed windows of one stream, and weighted blends.

A split is one long token stream (documents separated by eos, as packed by `prepare_dataset`).
Sample k is the window stream[k*seq_len : k*seq_len + seq_len + 1]: the first seq_len tokens are
the input and the last seq_len the labels. Windows do not overlap, ignore document boundaries and
may span two shard files. Nothing is read until a sample is asked for (numpy memmap).
With `loss_mask` (data of kind "sft") a sample is [2, seq_len + 1]: the tokens and, below them,
the stored mask (1 on response tokens) of the same positions.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from scaletrain.data.format import DataError, read_metadata

logger = logging.getLogger(__name__)


class SampleDataset(Protocol):
    """What BlendedDataset needs from its parts."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


class TokenDataset:
    """Non-overlapping windows of seq_len + 1 tokens over one split of a prepared data set."""

    def __init__(self, path: str | Path, split: str, seq_len: int, loss_mask: bool = False) -> None:
        if seq_len < 1:
            raise DataError(f"seq_len ({seq_len}) must be >= 1")
        self.path = Path(path)
        self.split = split
        self.seq_len = seq_len
        self.loss_mask = loss_mask
        info = read_metadata(self.path)
        if loss_mask and info.kind != "sft":
            raise DataError(
                f"data set {str(path)!r} has no loss mask (kind {info.kind!r}); train.task: sft "
                "reads data prepared with `scaletrain data prepare --format chat|prompt-response`"
            )
        if split not in info.splits:
            raise DataError(
                f"data set {str(path)!r} has no split {split!r} (it has {', '.join(info.splits)})"
            )
        s = info.splits[split]
        self.vocab_size = info.vocab_size
        self.eos_id = info.eos_id
        self.num_tokens = s.num_tokens
        self.num_documents = s.num_documents
        if self.num_tokens < seq_len + 1:
            raise DataError(
                f"split {split!r} of {str(path)!r} has {self.num_tokens} tokens, fewer than one "
                f"window of seq_len + 1 = {seq_len + 1}; lower seq_len or prepare more data"
            )
        self._shards = self._open(s.shards, info.dtype)
        self._masks = self._open(s.mask_shards, "uint8") if loss_mask else []
        # starts[j] = stream offset of shard j's first token; starts[-1] = stream length.
        self._starts = np.cumsum([0] + [len(m) for m in self._shards])
        self._len = (self.num_tokens - 1) // seq_len

    def _open(self, shards: list, dtype: str) -> list[np.memmap]:
        out = []
        for shard in shards:
            file = self.path / shard.file
            if not file.is_file() or file.stat().st_size != shard.num_bytes:
                raise DataError(
                    f"shard {str(file)!r} is missing or has the wrong size; prepare the data again"
                )
            if shard.num_tokens:
                out.append(np.memmap(file, dtype=dtype, mode="r"))
        return out

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> np.ndarray:
        start = _sample_position(index, self._len) * self.seq_len
        stop = start + self.seq_len + 1
        if self.loss_mask:
            return np.stack([self.tokens(start, stop), self.mask(start, stop)])
        return self.tokens(start, stop)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """stream[start:stop] as int64, gathered across shard borders."""
        return self._gather(self._shards, start, stop)

    def mask(self, start: int, stop: int) -> np.ndarray:
        """The loss mask of stream[start:stop] (1: a response token), as int64."""
        return self._gather(self._masks, start, stop)

    def _gather(self, shards: list[np.memmap], start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.num_tokens})")
        out = np.empty(stop - start, dtype=np.int64)
        j = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            shard = shards[j]
            lo = pos - int(self._starts[j])
            hi = min(stop - int(self._starts[j]), len(shard))
            out[pos - start : pos - start + hi - lo] = shard[lo:hi]
            pos += hi - lo
            j += 1
        return out

    # Memmaps would be pickled as full in-memory copies (spawned DataLoader workers); reopen.
    def __getstate__(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "split": self.split,
            "seq_len": self.seq_len,
            "loss_mask": self.loss_mask,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        TokenDataset.__init__(
            self, state["path"], state["split"], state["seq_len"], state.get("loss_mask", False)
        )

    def __repr__(self) -> str:
        return (
            f"TokenDataset({str(self.path)!r}, split={self.split!r}, seq_len={self.seq_len}, "
            f"samples={self._len}, tokens={self.num_tokens})"
        )


class BlendedDataset:
    """A deterministic weighted mix of datasets (Megatron's blended dataset).

    Global sample i comes from dataset `dataset_index[i]`, sample `sample_index[i]` of it. The
    dataset is picked greedily as the one furthest behind its share, so after every prefix of n
    samples each dataset has weight * n of them to within one sample (for up to three datasets;
    slightly more than one is possible with many). Which samples of a dataset are used is a
    seed-dependent permutation, redrawn each time a dataset is exhausted and starts over.
    `size` defaults to the parts' total number of samples.
    """

    def __init__(
        self,
        datasets: Sequence[SampleDataset],
        weights: Sequence[float],
        seed: int,
        size: int | None = None,
    ) -> None:
        if not datasets:
            raise DataError("BlendedDataset needs at least one dataset")
        if len(weights) != len(datasets):
            raise DataError(f"got {len(weights)} weights for {len(datasets)} datasets")
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise DataError(f"blend weights ({list(weights)}) must be >= 0 with a positive sum")
        self.weights = w / w.sum()
        self.datasets = list(datasets)
        lengths = [len(d) for d in self.datasets]
        for k, (n, wk) in enumerate(zip(lengths, self.weights, strict=True)):
            if n == 0 and wk > 0:
                raise DataError(f"dataset {k} of the blend is empty but has weight {wk:.3f}")
        self.size = sum(lengths) if size is None else size
        if self.size < 0:
            raise DataError(f"blend size ({size}) must be >= 0")
        self.seed = seed
        self.dataset_index = _greedy_blend(self.weights, self.size)
        self.sample_index = _sample_indices(self.dataset_index, lengths, seed)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> np.ndarray:
        i = _sample_position(index, self.size)
        d = int(self.dataset_index[i])
        return self.datasets[d][int(self.sample_index[i])]


def _sample_position(index: int, size: int) -> int:
    """`index` as a position in [0, size), Python-style negatives allowed."""
    i = operator.index(index)
    if i < 0:
        i += size
    if not 0 <= i < size:
        raise IndexError(f"sample {index} out of range for {size} samples")
    return i


def _greedy_blend(weights: np.ndarray, size: int) -> np.ndarray:
    """For each sample the dataset whose count lags furthest behind weight * (samples so far).

    Plain Python on lists: about 0.7 s per million samples for two datasets, once per run.
    """
    w = weights.tolist()
    counts = [0] * len(w)
    out = np.empty(size, dtype=np.int32)
    order = range(len(w))
    for i in range(size):
        n = i + 1
        best, best_lag = 0, w[0] * n - counts[0]
        for d in order:
            lag = w[d] * n - counts[d]
            if lag > best_lag:
                best, best_lag = d, lag
        out[i] = best
        counts[best] += 1
    return out


def _sample_indices(dataset_index: np.ndarray, lengths: list[int], seed: int) -> np.ndarray:
    """The c-th use of dataset d maps to perm_(d, c // len)[c % len], seeded per pass."""
    out = np.empty(len(dataset_index), dtype=np.int64)
    for d, n in enumerate(lengths):
        where = np.flatnonzero(dataset_index == d)
        if where.size == 0:
            continue
        passes = -(-where.size // n)
        perms = [np.random.default_rng((seed, d, p)).permutation(n) for p in range(passes)]
        out[where] = np.concatenate(perms)[: where.size]
    return out


def build_dataset(
    paths: Sequence[str | Path],
    weights: Sequence[float] | None,
    split: str,
    seq_len: int,
    seed: int,
    loss_mask: bool = False,
) -> TokenDataset | BlendedDataset:
    """The dataset a run trains or evaluates on: one prepared folder, or a blend of several.

    weights None weighs the folders equally (as `data.weights: null` in the config promises).
    loss_mask: samples carry the SFT loss mask (every folder must be of kind "sft").
    """
    if not paths:
        raise DataError("no data paths given; prepare data with `scaletrain data prepare`")
    if weights is not None and len(weights) != len(paths):
        raise DataError(f"got {len(weights)} weights for {len(paths)} data paths; give one each")
    if len(paths) == 1:
        return TokenDataset(paths[0], split, seq_len, loss_mask)
    parts = [TokenDataset(p, split, seq_len, loss_mask) for p in paths]
    blend = BlendedDataset(parts, weights if weights is not None else [1.0] * len(parts), seed)
    logger.info(
        "blending %s (%s split) with weights %s: %d samples",
        [str(p) for p in paths],
        split,
        np.round(blend.weights, 4).tolist(),
        len(blend),
    )
    return blend
