"""Which sample indices each data-parallel rank trains on at each step, resumable exactly.

The order of global batches depends only on (seed, epoch), never on the number of data-parallel
ranks: rank r takes the r-th contiguous slice of every global batch. The union over ranks of one
step is therefore the same set of samples for DP=1 and DP=8, which lets a DP=2 run reproduce a
DP=1 run, and a checkpoint can be resumed with a different DP size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from scaletrain.data.format import DataError

logger = logging.getLogger(__name__)


class GlobalBatchSampler:
    """Hands this rank its slice of one global batch per step, epoch after epoch, forever.

    Each epoch is a permutation of range(num_samples) drawn from default_rng((seed, epoch)) (or
    the identity without shuffle), cut into global batches; a last partial global batch is
    dropped and the next epoch begins.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank ({dp_rank}) must be in [0, dp_size ({dp_size}))")
        if global_batch < 1 or global_batch % dp_size:
            raise DataError(
                f"global_batch ({global_batch}) must be a positive multiple of dp_size ({dp_size})"
            )
        if global_batch > num_samples:
            raise DataError(
                f"global_batch ({global_batch}) is larger than the dataset ({num_samples} "
                "samples); lower it or use more data / a shorter seq_len"
            )
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.local_batch = global_batch // dp_size
        self.batches_per_epoch = num_samples // global_batch
        self.consumed_samples = 0
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @property
    def epoch(self) -> int:
        return self.consumed_samples // (self.batches_per_epoch * self.global_batch)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            if self.shuffle:
                rng = np.random.default_rng((self.seed, epoch))
                self._order = rng.permutation(self.num_samples)
            else:
                self._order = np.arange(self.num_samples, dtype=np.int64)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> np.ndarray:
        """This rank's sample indices (global_batch // dp_size of them) for the next step."""
        epoch = self.epoch
        step_in_epoch = self.consumed_samples // self.global_batch - epoch * self.batches_per_epoch
        start = step_in_epoch * self.global_batch + self.dp_rank * self.local_batch
        batch = self._epoch_order(epoch)[start : start + self.local_batch].copy()
        self.consumed_samples += self.global_batch
        return batch

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        return self.next_batch()

    def __len__(self) -> int:
        """Steps per epoch (iteration itself never ends)."""
        return self.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        """Position as global samples consumed; independent of dp_rank and dp_size."""
        return {
            "epoch": self.epoch,
            "consumed_samples": self.consumed_samples,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch": self.global_batch,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken; the dataset and batch must be the same."""
        for key in ("seed", "num_samples", "global_batch", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(
                    f"sampler state has {key}={state[key]} but this run has "
                    f"{key}={getattr(self, key)}; resume with the same data and batch settings"
                )
        consumed = int(state["consumed_samples"])
        if consumed < 0 or consumed % self.global_batch:
            raise DataError(
                f"sampler state consumed_samples ({consumed}) is not a multiple of "
                f"global_batch ({self.global_batch})"
            )
        epoch = consumed // (self.batches_per_epoch * self.global_batch)
        if "epoch" in state and int(state["epoch"]) != epoch:
            raise DataError(
                f"sampler state epoch ({state['epoch']}) does not match consumed_samples "
                f"({consumed}, i.e. epoch {epoch})"
            )
        self.consumed_samples = consumed
