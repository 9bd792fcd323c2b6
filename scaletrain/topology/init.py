"""Bring up torch.distributed and build the `Topology` every other part receives.

The only device decision in the code base: CUDA + nccl when a GPU is present (and
DS_ACCELERATOR is not `cpu`), otherwise CPU + gloo (and DeepSpeed's CPU accelerator). A plain
`python -m scaletrain train` without torchrun runs as a world of one.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from scaletrain.topology.dims import ParallelDims
from scaletrain.topology.megatron import (
    DeepSpeedMpu,
    ProcessGroups,
    build_groups,
    destroy_groups,
    existing_groups,
    release_groups,
)


def select_device() -> tuple[torch.device, str]:
    """(device, backend) for this process; also tells DeepSpeed which accelerator to use."""
    # megatron-core's async TP all-reduce wants one CUDA work queue (it warns otherwise); must be
    # set before the CUDA context exists, and means nothing on the CPU.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    # DS_ACCELERATOR=cpu (the CPU tests' setting) keeps a run on the CPU where a GPU is present
    # too: DeepSpeed's CPU accelerator next to CUDA tensors and nccl would fail on its first op.
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return torch.device("cpu"), "gloo"


def env_world_size() -> int:
    """The world size torchrun (or SLURM through torchrun) announced; 1 without a launcher."""
    return int(os.environ.get("WORLD_SIZE", 1))


@dataclass
class Topology:
    """Degrees, this rank's coordinates, its process groups, device and backend."""

    dims: ParallelDims
    rank: int
    local_rank: int
    coords: dict[str, int]
    device: torch.device
    backend: str
    groups: ProcessGroups
    mpu: DeepSpeedMpu
    world_groups: frozenset[dist.ProcessGroup] = field(default_factory=frozenset)
    """The groups that existed before this topology's: `release` keeps them."""

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.coords["dp"]

    def mean_over_dp(self, value: torch.Tensor) -> torch.Tensor:
        """Average a tensor over the data-parallel ranks (e.g. the loss of a global batch)."""
        value = value.detach().to(self.device, torch.float32).clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.groups.dp)
        return value / self.dims.dp

    def barrier(self) -> None:
        dist.barrier()

    def release(self) -> None:
        """Free this layout's groups but keep the world, so that the same processes can
        build another layout next (`scaletrain scaletest`). Collective."""
        dist.barrier()
        release_groups(self.world_groups)

    def destroy(self) -> None:
        destroy_groups()
        if dist.is_initialized():
            dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Same seed on every rank: weights are built whole and then split, so TP=N starts like TP=1."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_topology(dims: ParallelDims, timeout_minutes: float = 10) -> Topology:
    """Start torch.distributed (unless already started) and create every process group."""
    device, backend = select_device()
    if "RANK" not in os.environ:
        _single_process_env()
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, timeout=timedelta(minutes=timeout_minutes), device_id=None
        )
    import deepspeed  # after select_device(): DS_ACCELERATOR must be set before this import

    deepspeed.init_distributed(dist_backend=backend)  # DeepSpeed's comm wraps our group
    rank = dist.get_rank()
    world_groups = existing_groups()
    groups = build_groups(dims, timeout_minutes)
    return Topology(
        dims=dims,
        rank=rank,
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        coords=dims.coords(rank),
        device=device,
        backend=backend,
        groups=groups,
        mpu=DeepSpeedMpu(groups),
        world_groups=world_groups,
    )


def _single_process_env() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
