"""The ranks of `scaletrain scaletest`: train every layout in turn inside one torchrun.

    torchrun --nproc-per-node 4 -m scaletrain.scaletest.worker <plan.json>

Importing DeepSpeed and megatron-core costs each rank seconds, so the world is started once:
for each layout the ranks build its process groups, train K steps with the ordinary `Trainer`,
and release the groups again (`Topology.release`) without tearing down torch.distributed.
Rank 0 writes `result.json` (every rank's peak of live tensor bytes in the steps after the
first, the quantity `scaletrain plan` predicts; wall time) next to the layout's
metrics.jsonl; the losses and step times are read from metrics.jsonl by the caller.
Run without torchrun, the worker is a world of one (the single-rank reference).
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scaletrain.config.schema import Config

RESULT_FILE = "result.json"
STARTED_FILE = "started"


def write_plan(path: Path, config: Config, world_size: int, runs: dict[str, Path]) -> None:
    """The worker's input: the config without a layout, the world size, and name -> run dir
    for every layout to train (in order)."""
    from scaletrain.config.load import to_dict

    plan = {
        "config": to_dict(config),
        "world_size": world_size,
        "runs": {name: str(run_dir) for name, run_dir in runs.items()},
    }
    path.write_text(json.dumps(plan, indent=1))


def run_plan(plan_file: Path) -> None:
    """Train every layout of the plan in turn on this world; every rank runs the same loop."""
    # Imported here: `write_plan` is used by the CLI, which should not pay for DeepSpeed.
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from scaletrain.config.load import from_dict
    from scaletrain.fault.signals import die_with_launcher
    from scaletrain.hf.imports import apply_init_from
    from scaletrain.logs import get_logger, setup_logging
    from scaletrain.plan.measure import live_bytes, mark_steps
    from scaletrain.scaletest.layouts import parse_layout, validate
    from scaletrain.topology.init import init_topology
    from scaletrain.train.metrics import peak_memory_bytes, reset_peak_memory
    from scaletrain.train.trainer import Trainer

    setup_logging()
    log = get_logger(__name__)
    die_with_launcher()
    plan = json.loads(plan_file.read_text())
    base, world_size = from_dict(plan["config"]), plan["world_size"]
    if base.train.deterministic:  # as `scaletrain train` does
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
    runs = plan["runs"]
    for i, (name, run_dir) in enumerate(runs.items(), 1):
        layout = parse_layout(name, base.parallel.zero_stage)
        config = layout.apply(base)
        config.train.run_dir = run_dir
        apply_init_from(config)  # validate() checks a copy: the HF folder's fields go here too
        resolved = validate(config, layout, world_size)
        topology = init_topology(resolved.dims, config.fault.collective_timeout_minutes)
        if topology.is_main:
            log.info("scaletest layout %d/%d: %s", i, len(runs), layout.name)
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            (Path(run_dir) / STARTED_FILE).write_text(layout.name)
        gc.collect()  # what the previous layout left behind should not count against this one
        reset_peak_memory(topology.device)
        on_cpu = topology.device.type == "cpu"
        # On the CPU, live tensor bytes come from the profiler's memory events (the planner's
        # quantity, as benchmarks/plan_accuracy.py measures it); on a GPU, max allocated.
        window = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        start = time.perf_counter()
        with window if on_cpu else contextlib.nullcontext():
            trainer = Trainer(config, topology, resolved)
            trainer.train_step = mark_steps(trainer.train_step)
            trainer.run()
            seconds = time.perf_counter() - start
            # DeepSpeed's hooks on autograd nodes keep an engine alive past its last reference
            # (the garbage collector cannot see through them); its own destroy() removes them.
            trainer.engine.destroy()
            del trainer
        peak = live_bytes(window)[0] if on_cpu else peak_memory_bytes(topology.device)
        del window
        peaks: list[int] = [0] * world_size
        dist.all_gather_object(peaks, peak)
        topology.release()
        if topology.is_main:
            result = {"layout": layout.name, "peak_mem_bytes": peaks, "seconds": seconds}
            (Path(run_dir) / RESULT_FILE).write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m scaletrain.scaletest.worker <plan.json>", file=sys.stderr)
        return 2
    run_plan(Path(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
