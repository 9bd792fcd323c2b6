"""Measured memory of real training steps, per rank: what the planner's numbers are checked against.

    torchrun --nproc-per-node 2 -m scaletrain.plan.measure <cases.json> <result.json>

Like `scaletrain scaletest`, one torchrun trains many cases (layouts, precisions, recompute
modes) in turn on one process group. Each case builds the ordinary `Trainer` and runs a few
steps inside `torch.profiler` with memory profiling, so every tensor allocation and free of the
case is seen (they all happen inside the window). Reported per rank:

- `peak_bytes`: the peak of live tensor bytes (the running sum of allocations minus frees), the
  CPU analogue of `torch.cuda.max_memory_allocated`; not the resident set, which also holds the
  interpreter, libraries and freed-but-cached pages. It is the lowest per-step peak after the
  first step (see `live_bytes`); `first_steps_peak_bytes` is the peak of the whole case,
  model build and first step included.
- `states_bytes`: live tensor bytes when the optimizer's step begins on the last step (a global
  optimizer pre-step hook marks the moment): parameters, gradients, optimizer state and the ZeRO
  buffers that persist, with the activations already freed by backward.
"""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARK = "scaletrain.plan.states"
STEP = "scaletrain.plan.step"


def live_bytes(prof: Any) -> tuple[int, int, int]:
    """(steady peak, peak, at the last MARK) of live CPU tensor bytes over one window.

    The steady peak is the lowest of the per-step peaks after the first step (which also
    creates the optimizer state): DeepSpeed and gloo free some buffers asynchronously, so
    one step's peak can catch a buffer that another step has already released.
    """
    from torch._C._profiler import _EventType

    events: list[tuple[int, int, str]] = []  # (time, +bytes / -bytes, mark name or "")
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size, ""))
        elif node.name in (MARK, STEP):
            events.append((node.start_time_ns, 0, node.name))
    events.sort(key=lambda e: (e[0], e[2] == ""))
    total = peak = at_mark = 0
    step_peaks: list[int] = []
    for _, size, name in events:
        if name == MARK:
            at_mark = total
        elif name == STEP:
            step_peaks.append(total)
        total += size
        peak = max(peak, total)
        if step_peaks:
            step_peaks[-1] = max(step_peaks[-1], total)
    steady = min(step_peaks[1:]) if len(step_peaks) > 1 else peak
    return steady, peak, at_mark


def mark_steps(step: Callable[[], Any]) -> Callable[[], Any]:
    """`step` with a STEP mark in the profile before each call: how `live_bytes` tells the
    steps apart when the caller's loop (e.g. `Trainer.run`) is not ours to edit."""
    import torch

    def marked() -> Any:
        with torch.profiler.record_function(STEP):
            pass
        return step()

    return marked


class _StepMark:
    """A global optimizer pre-step hook that marks the first optimizer call of a step once
    armed. ZeRO-1/2 step their param groups one at a time and free each group's gradient
    partition after its step, so only the first call sees the gradients."""

    armed = False

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        import torch

        if not self.armed:
            return
        self.armed = False
        gc.collect()  # unreachable cycles are freed at random times: not part of the state
        with torch.profiler.record_function(MARK):
            pass


def run_cases(cases_file: Path, result_file: Path) -> None:
    """Train every case of the file for its steps; rank 0 writes the per-rank bytes."""
    import torch
    import torch.distributed as dist
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    from torch.profiler import ProfilerActivity, profile

    from scaletrain.config import check_config, load_config
    from scaletrain.logs import setup_logging
    from scaletrain.topology.init import env_world_size, init_topology
    from scaletrain.train.trainer import Trainer

    setup_logging()
    spec = json.loads(cases_file.read_text())
    torch.set_num_threads(1)
    mark = _StepMark()
    register_optimizer_step_pre_hook(mark)
    results = []
    for case in spec["cases"]:
        config = load_config(spec["config"], spec.get("overrides", []) + case["overrides"])
        steps = spec.get("steps", 3)
        config.train.steps = max(config.train.steps, steps)
        resolved = check_config(config, env_world_size())
        topology = init_topology(resolved.dims)
        gc.collect()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            trainer = Trainer(config, topology, resolved)
            for _ in range(steps):
                mark.armed = True  # the last step's first optimizer call is the one kept
                with torch.profiler.record_function(STEP):
                    pass
                trainer.train_step()
            trainer.engine.destroy()
            del trainer
            gc.collect()
        steady, peak, states = live_bytes(prof)
        del prof
        per_rank: list[Any] = [None] * topology.world_size
        measured = {"peak_bytes": steady, "first_steps_peak_bytes": peak, "states_bytes": states}
        dist.all_gather_object(per_rank, measured)
        topology.release()
        results.append({"name": case["name"], "overrides": case["overrides"], "ranks": per_rank})
    if dist.get_rank() == 0:
        result_file.write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(
            "usage: python -m scaletrain.plan.measure <cases.json> <result.json>", file=sys.stderr
        )
        return 2
    run_cases(Path(args[0]), Path(args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
