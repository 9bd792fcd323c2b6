"""Train several configs in turn inside one torchrun world (as `scaletrain scaletest`'s worker
does), so that one process start-up pays for many layouts.

    torchrun --nproc-per-node N tests/train/moe_layouts_run.py plan.json

plan.json: {"runs": [{"config": C, "overrides": [...], "hang_at": S?, "score_bias": B?,
"stop_after": N?}, ...]}. A run with `hang_at` makes the last rank sleep before step S (the
others wait for it in a collective), so that a test can kill the ranks mid-run. `score_bias`
starts every router's selection bias at B (a router that favours some experts) and has every
rank write its routers' final biases to <run_dir>/score_bias.<rank>.json. `stop_after` asks
for a stop after step N, as SIGUSR1 would (checkpoint, then StopRequested); the next run of the
same run dir resumes. Test-only hooks, not user settings.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from scaletrain.config import check_config, load_config
from scaletrain.fault.signals import StopRequested, die_with_launcher
from scaletrain.logs import setup_logging
from scaletrain.topology.init import env_world_size, init_topology
from scaletrain.train.trainer import Trainer
from tests.trainer_script import LIFT_CPU_FP16_GATE, lift_cpu_fp16_gate


def hang_before(trainer: Trainer, step: int) -> None:
    """This rank sleeps before training `step`; the other ranks wait for it."""
    train_step = trainer.train_step

    def hanging_step() -> dict[str, float]:
        if trainer.step + 1 == step:
            time.sleep(3600)
        return train_step()

    trainer.train_step = hanging_step  # type: ignore[method-assign]


def stop_after(trainer: Trainer, step: int) -> None:
    """A stop request (as SIGUSR1 on every rank) once `step` has been trained."""
    train_step = trainer.train_step

    def stopping_step() -> dict[str, float]:
        metrics = train_step()
        if trainer.step == step:
            trainer.stopwatch.signal = signal.SIGUSR1
        return metrics

    trainer.train_step = stopping_step  # type: ignore[method-assign]


def run(plan: dict) -> None:
    for spec in plan["runs"]:
        config = load_config(spec["config"], spec["overrides"])
        resolved = check_config(config, env_world_size())
        topology = init_topology(resolved.dims, config.fault.collective_timeout_minutes)
        trainer = Trainer(config, topology, resolved)
        if spec.get("hang_at") is not None and topology.rank == topology.world_size - 1:
            hang_before(trainer, spec["hang_at"])
        gates = trainer.engine.module.moe_stats.gates if "score_bias" in spec else {}
        for gate in gates.values():
            gate.score_bias.copy_(torch.tensor(spec["score_bias"]))
        if spec.get("stop_after") is not None:
            stop_after(trainer, spec["stop_after"])
        try:
            trainer.run()
        except StopRequested:
            if spec.get("stop_after") is None:
                raise
            trainer.close()  # the run directory's lock, as the process's exit would
        if gates:
            biases = {i: gate.score_bias.tolist() for i, gate in gates.items()}
            out = Path(config.train.run_dir) / f"score_bias.{topology.rank}.json"
            out.write_text(json.dumps(biases))
        trainer.engine.destroy()  # DeepSpeed's autograd hooks would keep the engine alive
        del trainer
        topology.release()


def main() -> None:
    setup_logging()
    die_with_launcher()
    if os.environ.get(LIFT_CPU_FP16_GATE) == "1":
        lift_cpu_fp16_gate()
    torch.set_num_threads(1)  # the runs are deterministic (train.deterministic)
    torch.use_deterministic_algorithms(True)
    run(json.loads(Path(sys.argv[1]).read_text()))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
