"""Parallel degrees and the rank layout, as plain data that can be printed without launching.

Ranks are laid out like megatron-core's default order `tp-cp-ep-dp-pp`: tensor-parallel
neighbours are adjacent ranks (they talk most, so they share a node), pipeline stages are the
slowest-varying index. Every group is a slice of one numpy rank grid of shape (pp, dp, tp).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scaletrain.errors import ConfigError

AXES = ("pp", "dp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of each kind of parallelism; their product is the world size."""

    tp: int
    pp: int
    dp: int
    ep: int = 1

    @classmethod
    def resolve(cls, tp: int, pp: int, dp: int | None, ep: int, world_size: int) -> ParallelDims:
        """Check the degrees against the world size (deriving dp when it is None)."""
        for name, value in (("tp", tp), ("pp", pp), ("ep", ep)):
            if value < 1:
                raise ConfigError(f"parallel.{name}", f"must be >= 1, got {value}")
        if world_size < 1:
            raise ConfigError("world_size", f"must be >= 1, got {world_size}")
        if dp is None:
            if world_size % (tp * pp):
                raise ConfigError(
                    "parallel",
                    f"world size ({world_size}) is not divisible by tp ({tp}) * pp ({pp}); "
                    "change tp/pp or the number of ranks",
                )
            dp = world_size // (tp * pp)
        elif dp < 1:
            raise ConfigError("parallel.dp", f"must be >= 1 or null, got {dp}")
        elif tp * pp * dp != world_size:
            raise ConfigError(
                "parallel",
                f"tp ({tp}) * pp ({pp}) * dp ({dp}) = {tp * pp * dp} must equal the world size "
                f"({world_size}); set parallel.dp=null to derive dp",
            )
        if dp % ep:
            raise ConfigError(
                "parallel.ep", f"expert_parallel ({ep}) must divide data_parallel ({dp})"
            )
        return cls(tp=tp, pp=pp, dp=dp, ep=ep)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def grid(self) -> np.ndarray:
        """grid[pp, dp, tp] = global rank."""
        return np.arange(self.world_size).reshape(self.pp, self.dp, self.tp)

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index along every axis, e.g. {'pp': 0, 'dp': 1, 'tp': 0}."""
        where = np.argwhere(self.grid() == rank)[0]
        return dict(zip(AXES, (int(i) for i in where), strict=True))

    def groups(self, axis: str) -> list[list[int]]:
        """All groups along one axis: the ranks that differ only in that coordinate."""
        grid = np.moveaxis(self.grid(), AXES.index(axis), -1)
        return grid.reshape(-1, grid.shape[-1]).tolist()

    def model_parallel_groups(self) -> list[list[int]]:
        """Ranks holding one full model replica together (tp x pp), as DeepSpeed's mpu calls it."""
        grid = np.moveaxis(self.grid(), 1, 0)
        return grid.reshape(self.dp, -1).tolist()

    def describe(self) -> str:
        return f"tp{self.tp}pp{self.pp}dp{self.dp}" + (f"ep{self.ep}" if self.ep > 1 else "")
