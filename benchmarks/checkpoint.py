"""What a checkpoint save costs: save throughput vs a raw sequential write of the same bytes.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/checkpoint.py [--saves 4] [overrides]

One process, one rank (TP1, DP1, ZeRO-0, fp32) with a model of ~170M parameters (hidden 1024,
12 layers, vocabulary 32000): one optimizer step so that Adam's moments exist, then
`Trainer.save` (CheckpointManager.save: DeepSpeed's files, RNG, fsync + checksum of every file,
manifest, rename, `latest`, retention) several times. Between saves, the same number of bytes
is written to the same folder in 64 MB chunks and fsynced: the disk's sequential speed,
measured in the same run. Saves are synchronous, so a save's wall time is also the time the
training loop is blocked. Target: save throughput >= 0.5x the raw write.

Then the same model trains `--steps-per-save` steps between saves, `--saves` rounds with
synchronous saves and as many with `checkpoint.async_save` (the loop waits only for the host
snapshot; a background thread writes, checksums and publishes): the loop's blocked time per save,
each mode's throughput (training steps per second over the rounds, the wait for the last write
included, and MB/s from a save's start to its checkpoint being published), and their ratio on a
line of its own. Target: async/sync blocked time <= 0.2x.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np

from scaletrain.checkpoint.async_save import AsyncWriter
from scaletrain.checkpoint.manifest import Manifest
from scaletrain.config import check_config, load_config
from scaletrain.logs import setup_logging
from scaletrain.topology.init import init_topology
from scaletrain.train.trainer import Trainer

RUN_DIR = Path("runs/bench-checkpoint")
BASE = [
    "model.hidden_size=1024",
    "model.num_layers=12",
    "model.num_heads=16",
    "model.num_kv_heads=4",
    "model.ffn_hidden_size=2816",
    "model.vocab_size=32000",
    "model.tie_embeddings=false",
    "parallel.tp=1",
    "parallel.zero_stage=0",
    "precision.dtype=fp32",
    "train.micro_batch=1",
    "train.global_batch=1",
    "train.seq_len=32",
    "train.eval_interval=0",
    "logging.jsonl=false",
    f"train.run_dir={RUN_DIR}",
    "checkpoint.resume=none",
    "checkpoint.keep_last=2",  # from the third save on, a save also deletes the oldest
]
CHUNK = 64 << 20


def raw_write(path: Path, size: int, chunk: bytes) -> float:
    """Seconds to write `size` bytes sequentially and fsync them (the file is removed after)."""
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, chunk[: min(left, len(chunk))])
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def timed(owner: object, method: str) -> list[float]:
    """Record the wall time of every call of `owner.method` (instrumentation only)."""
    calls: list[float] = []
    original = getattr(owner, method)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            calls.append(time.perf_counter() - start)

    setattr(owner, method, wrapper)
    return calls


@dataclass
class Rounds:
    blocked: list[float]
    waited: list[float]
    rate: float
    published: list[float]


def rounds(trainer: Trainer, saves: int, steps: int) -> Rounds:
    """`saves` rounds of `steps` training steps and a save: the loop's blocked time per save
    (of which `waited`: for the previous async write, when the steps took less time than it),
    the steps per second of the whole (the last async write waited for), and each save's time
    from its start until its checkpoint was published."""
    blocked, waited, published = [], [], []
    start = time.perf_counter()
    for _ in range(saves):
        for _ in range(steps):
            trainer.train_step()
        began = time.perf_counter()
        trainer.checkpoints.finish_writes()  # what save() does first
        waited.append(time.perf_counter() - began)
        trainer.save()
        blocked.append(time.perf_counter() - began)
        if trainer.checkpoints.writer is None:
            published.append(blocked[-1])
    trainer.checkpoints.finish_writes()
    elapsed = time.perf_counter() - start
    writer = trainer.checkpoints.writer
    if writer is not None:
        published = writer.history
    return Rounds(blocked, waited, saves * steps / elapsed, published)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/runs/quickstart.yaml")
    parser.add_argument("--saves", type=int, default=4, help="timed saves (and raw writes)")
    parser.add_argument("--steps-per-save", type=int, default=3, help="steps between saves")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    setup_logging()
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    config = load_config(args.config, [*BASE, *args.overrides])
    resolved = check_config(config, world_size=1)
    topology = init_topology(resolved.dims)
    trainer = Trainer(config, topology, resolved)
    params = sum(p.numel() for p in trainer.engine.module.parameters())
    trainer.train_step()  # Adam's moments exist only after a step

    # Where a save's time goes: DeepSpeed's torch.save (into the page cache), the manager's
    # fsync + checksum of every file, and retention (deleting the oldest checkpoint).
    parts = {
        "torch.save": timed(trainer.engine, "save_checkpoint"),
        "fsync+checksum": timed(trainer.checkpoints, "_describe_files"),
        "retention": timed(trainer.checkpoints, "_prune"),
    }
    chunk = np.random.default_rng(0).integers(0, 256, CHUNK, dtype=np.uint8).tobytes()
    saves, raws, sizes = [], [], []
    for i in range(args.saves):
        trainer.step = i + 1
        start = time.perf_counter()
        folder = trainer.save()
        saves.append(time.perf_counter() - start)
        manifest = Manifest.read(folder)
        assert manifest is not None
        sizes.append(manifest.total_bytes)
        raws.append(raw_write(RUN_DIR / "raw.bin", manifest.total_bytes, chunk))

    size = statistics.median(sizes)
    save_s, raw_s = statistics.median(saves), statistics.median(raws)
    save_rate, raw_rate = size / save_s, size / raw_s
    print(
        f"model: {config.model.hidden_size}d x {config.model.num_layers} layers, vocab "
        f"{resolved.padded_vocab_size}, {params / 1e6:.1f}M parameters (fp32 + Adam); "
        f"checkpoint {size / 1e9:.2f} GB in {len(manifest.files)} files; {args.saves} saves"
    )
    print(f"saves (s)      : {' '.join(f'{s:.2f}' for s in saves)}")
    print(f"raw writes (s) : {' '.join(f'{s:.2f}' for s in raws)}")
    print(f"raw write      : {raw_rate / 1e6:8.0f} MB/s  ({raw_s:.2f} s, median)")
    print(f"checkpoint save: {save_rate / 1e6:8.0f} MB/s  ({save_s:.2f} s, median)")
    print(f"save / raw throughput = {save_rate / raw_rate:.2f}x (target >= 0.5x)")
    print(f"training blocked per save: {save_s:.2f} s (median; saves are synchronous)")
    for name, calls in parts.items():
        print(f"  {name:<15}: {' '.join(f'{s:.2f}' for s in calls)} s")

    steps = args.steps_per_save
    trainer.checkpoints.writer = None
    modes = {"sync": rounds(trainer, args.saves, steps)}
    trainer.checkpoints.writer = AsyncWriter(config.fault.collective_timeout_minutes)
    modes["async"] = rounds(trainer, args.saves, steps)
    print(f"{args.saves} rounds of {steps} steps + a save, sync then async_save:")
    for name, m in modes.items():
        done = statistics.median(m.published)
        print(
            f"  {name:<5}: loop blocked {' '.join(f'{b:.2f}' for b in m.blocked)} s (median "
            f"{statistics.median(m.blocked):.2f}; waiting for the previous write "
            f"{sum(m.waited):.2f} s in all); {m.rate:.3f} steps/s; save "
            f"{size / done / 1e6:.0f} MB/s from start to published ({done:.2f} s)"
        )
    sync, background = modes["sync"], modes["async"]
    ratio = statistics.median(background.blocked) / statistics.median(sync.blocked)
    print(f"async/sync blocked time {ratio:.2f}x (target <= 0.2x)")
    print(f"async/sync loop throughput {background.rate / sync.rate:.2f}x")
    topology.destroy()
    shutil.rmtree(RUN_DIR, ignore_errors=True)


if __name__ == "__main__":
    main()
