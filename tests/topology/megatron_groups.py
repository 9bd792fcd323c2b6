"""Write megatron-core's process groups for a world of CPU ranks (gloo) as JSON.

    python tests/topology/megatron_groups.py OUT.json 4 2x2 2x1 1x2

Starts WORLD ranks with torch.multiprocessing; for each `TPxPP` layout every rank lets
megatron-core's `initialize_model_parallel` build its groups, records the ranks of its tp, pp,
dp and model-parallel groups, and tears them down again. OUT.json maps "TPxPP" to one entry per
rank: {"tp": [...], "pp": [...], "dp": [...], "model": [...]}. test_dims.py compares them with
ParallelDims.

The ranks are forked from this process after megatron-core is imported: importing it takes
seconds of CPU, and paying that once instead of once per rank keeps the test fast.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core import parallel_state


def _groups_of_this_rank(tp: int, pp: int) -> dict[str, list[int]]:
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        create_gloo_process_groups=False,
    )
    try:
        return {
            "tp": dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group()),
            "pp": dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group()),
            "dp": dist.get_process_group_ranks(parallel_state.get_data_parallel_group()),
            "model": dist.get_process_group_ranks(parallel_state.get_model_parallel_group()),
        }
    finally:
        parallel_state.destroy_model_parallel()


def _rank_main(rank: int, world_size: int, port: int, layouts: list[str], out: str) -> None:
    dist.init_process_group(
        backend="gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(minutes=2),
    )
    try:
        result = {}
        for layout in layouts:
            tp, pp = (int(x) for x in layout.split("x"))
            result[layout] = _groups_of_this_rank(tp, pp)
        Path(f"{out}.rank{rank}").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def main(out: str, world_size: int, layouts: list[str]) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(
        _rank_main,
        args=(world_size, port, layouts, out),
        nprocs=world_size,
        start_method="fork",
    )
    per_rank = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(world_size)]
    merged = {layout: [ranks[layout] for ranks in per_rank] for layout in layouts}
    Path(out).write_text(json.dumps(merged))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
