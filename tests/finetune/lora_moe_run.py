"""Train a LoRA run, write the live model's full weights, optionally resume it in a second run
(a test helper: one torchrun for a run and its resumed copy).

    torchrun --nproc-per-node N tests/finetune/lora_moe_run.py --out live.safetensors \
        [--resume-dir DIR --resume-step S] --config configs/runs/lora-tiny.yaml overrides...

The weights are those of the running engine after the last step, under the whole model's names
(global expert ids), from `tests.checkpoint.live_weights_run.live_weights`. With `--resume-dir`
a second Trainer in the same ranks starts from the first run's checkpoint at step S, writes its
own run directory DIR, and its live weights go to `<out>.resumed`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from scaletrain.checkpoint.manifest import tag_for
from scaletrain.config import check_config, load_config
from scaletrain.topology.init import Topology
from scaletrain.train.trainer import Trainer
from tests.checkpoint.live_weights_run import live_weights
from tests.trainer_script import trainer_from_argv


def _train_and_dump(trainer: Trainer, topology: Topology, out: Path) -> None:
    try:
        trainer.run()
    finally:
        trainer.close()
    weights = live_weights(trainer)
    if topology.is_main:
        save_file(weights, out)
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--resume-dir", type=Path)
    parser.add_argument("--resume-step", type=int, default=0)
    torch.set_num_threads(1)  # what `scaletrain train` does for train.deterministic
    torch.use_deterministic_algorithms(True)
    args, trainer, topology = trainer_from_argv(parser)
    _train_and_dump(trainer, topology, args.out)
    if args.resume_dir is not None:
        first = Path(trainer.config.train.run_dir) / "checkpoints" / tag_for(args.resume_step)
        more = [f"train.run_dir={args.resume_dir}", f"checkpoint.resume={first}"]
        config = load_config(args.config, [*args.overrides, *more])
        resolved = check_config(config, topology.world_size)
        resumed = Trainer(config, topology, resolved)
        _train_and_dump(resumed, topology, args.out.with_suffix(".resumed"))
    topology.destroy()


if __name__ == "__main__":
    main()
