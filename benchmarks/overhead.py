"""What scaletrain's engine costs over a plain PyTorch loop: step-time ratio, same model and data.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/overhead.py [--steps 30] [overrides]

One process, one rank (TP1, DP1, ZeRO-0, fp32). Both loops train the same GPT (same seed, so
the same initial weights) on the same batches with AdamW, warmup+cosine and gradient clipping:
  plain      : loss.backward(); clip_grad_norm_; optimizer.step(); scheduler.step()
  scaletrain : Trainer.train_step() (DeepSpeed engine, metrics, global-batch loss reduction)
They alternate in blocks so that drift of the machine hits both alike; the first steps of
each are warm-up and not timed. Target: ratio <= 1.10.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch

from scaletrain.config import check_config, load_config
from scaletrain.data import GlobalBatchSampler
from scaletrain.engine.deepspeed import param_groups
from scaletrain.logs import setup_logging
from scaletrain.models.gpt import GPT
from scaletrain.models.parallel import TensorParallel
from scaletrain.topology.init import init_topology, seed_everything
from scaletrain.train.schedule import build_scheduler
from scaletrain.train.trainer import Trainer

BASE = [
    "parallel.tp=1",
    "parallel.zero_stage=0",
    "precision.dtype=fp32",
    "train.micro_batch=8",
    "train.global_batch=8",
    "train.eval_interval=0",
    "logging.jsonl=false",
    "train.run_dir=runs/bench-overhead",
    "optim.warmup_steps=1",
    "checkpoint.resume=none",
]


class PlainLoop:
    """The baseline: the same model and optimizer without DeepSpeed or scaletrain."""

    def __init__(self, trainer: Trainer) -> None:
        config, resolved = trainer.config, trainer.resolved
        seed_everything(config.train.seed)
        self.model = GPT(config.model, resolved.padded_vocab_size, TensorParallel(1, None))
        o = config.optim
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps
        )
        self.scheduler = build_scheduler(self.optimizer, o, config.train.steps)
        self.clip = o.grad_clip
        self.trainer = trainer
        # Its own sampler with the same seed: the same batches, in the same order, as scaletrain.
        self.sampler = GlobalBatchSampler(
            len(trainer.train_set), resolved.global_batch, 0, 1, config.train.seed
        )

    def step(self) -> float:
        windows, _ = self.trainer._windows(self.trainer.train_set, self.sampler.next_batch())
        loss = self.model(windows)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss.item()


def timed(step, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/runs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=3, help="alternations")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    setup_logging()
    total = args.warmup + args.steps
    config = load_config(args.config, [*BASE, f"train.steps={2 * total}", *args.overrides])
    resolved = check_config(config, world_size=1)
    topology = init_topology(resolved.dims)
    trainer = Trainer(config, topology, resolved)
    plain = PlainLoop(trainer)
    timed(trainer.train_step, args.warmup)
    timed(plain.step, args.warmup)
    per_block = max(1, args.steps // args.blocks)
    ours, base = [], []
    for _ in range(args.blocks):
        ours += timed(trainer.train_step, per_block)
        base += timed(plain.step, per_block)
    ours_s, base_s = statistics.median(ours), statistics.median(base)
    tokens = resolved.global_batch * config.train.seq_len
    print(
        f"model: {config.model.hidden_size}d x {config.model.num_layers} layers, "
        f"{tokens} tokens/step, {torch.get_num_threads()} thread(s), {len(ours)} timed steps"
    )
    print(f"plain PyTorch : {base_s * 1e3:8.1f} ms/step  {tokens / base_s:10,.0f} tokens/s")
    print(f"scaletrain    : {ours_s * 1e3:8.1f} ms/step  {tokens / ours_s:10,.0f} tokens/s")
    print(f"step-time ratio scaletrain / plain = {ours_s / base_s:.3f} (target <= 1.10)")
    topology.destroy()


if __name__ == "__main__":
    main()
