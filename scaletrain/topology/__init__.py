"""Parallel degrees, rank layout, process groups, device."""

from scaletrain.topology.dims import ParallelDims

__all__ = ["ParallelDims"]
