"""The one place that talks to megatron-core's `parallel_state`, plus DeepSpeed's view of it.

megatron-core keeps its process groups in module globals; its layers and
`vocab_parallel_cross_entropy` read them. We build them once here from `ParallelDims` and
hand DeepSpeed an `mpu` adapter over the same groups, so that ZeRO shards and all-reduces
over the data-parallel group only and computes gradient norms over the model-parallel group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from megatron.core import parallel_state

from scaletrain.topology.dims import ParallelDims


@dataclass(frozen=True)
class ProcessGroups:
    """The named groups of this rank."""

    tp: dist.ProcessGroup
    pp: dist.ProcessGroup
    dp: dist.ProcessGroup
    model: dist.ProcessGroup
    """tp x pp: the ranks that together hold one replica of the model."""


def build_groups(dims: ParallelDims, timeout_minutes: float) -> ProcessGroups:
    """Create megatron-core's groups for these degrees (torch.distributed must be up)."""
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=False,
    )
    return ProcessGroups(
        tp=parallel_state.get_tensor_model_parallel_group(),
        pp=parallel_state.get_pipeline_model_parallel_group(),
        dp=parallel_state.get_data_parallel_group(),
        model=parallel_state.get_model_parallel_group(),
    )


def destroy_groups() -> None:
    parallel_state.destroy_model_parallel()


def existing_groups() -> frozenset[dist.ProcessGroup]:
    """Every process group this process holds now (torch keeps no public list of them)."""
    return frozenset(dist.distributed_c10d._world.pg_map)


def release_groups(keep: frozenset[dist.ProcessGroup]) -> None:
    """Destroy every group made since `keep` was taken -- megatron-core's, and DeepSpeed's
    cached ones (expert, world clone, its mpu) -- but not the world: another layout can then
    be built in the same processes. Every rank must call it (after a barrier)."""
    import deepspeed.comm as ds_comm
    from deepspeed.utils import groups as ds_groups

    parallel_state.destroy_model_parallel()
    names = dist.distributed_c10d._world.pg_names
    for group in sorted(existing_groups() - keep, key=names.get):  # same order on every rank
        ds_comm.destroy_process_group(group)  # also drops DeepSpeed's references to it
    ds_groups.mpu = None


class DeepSpeedMpu:
    """The `mpu` object DeepSpeed asks for groups, ranks and sizes."""

    def __init__(self, groups: ProcessGroups) -> None:
        self._groups = groups

    @staticmethod
    def _rank(group: dist.ProcessGroup) -> int:
        return dist.get_rank(group=group)

    @staticmethod
    def _size(group: dist.ProcessGroup) -> int:
        return dist.get_world_size(group=group)

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._groups.model

    def get_model_parallel_rank(self) -> int:
        return self._rank(self._groups.model)

    def get_model_parallel_world_size(self) -> int:
        return self._size(self._groups.model)

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return self._groups.tp

    def get_tensor_model_parallel_rank(self) -> int:
        return self._rank(self._groups.tp)

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._size(self._groups.tp)

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_global_rank(self._groups.tp, 0)

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return self._groups.pp

    def get_pipeline_model_parallel_rank(self) -> int:
        return self._rank(self._groups.pp)

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._size(self._groups.pp)

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._groups.dp

    def get_data_parallel_rank(self) -> int:
        return self._rank(self._groups.dp)

    def get_data_parallel_world_size(self) -> int:
        return self._size(self._groups.dp)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self._groups.dp)
