"""What a checkpoint save costs: save throughput vs a raw sequential write of the same bytes.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/checkpoint.py [--saves 4] [overrides]

One process, one rank (TP1, DP1, ZeRO-0, fp32) with a model of ~170M parameters (hidden 1024,
12 layers, vocabulary 32000): one optimizer step so that Adam's moments exist, then
`Trainer.save` (CheckpointManager.save: DeepSpeed's files, RNG, fsync + checksum of every file,
manifest, rename, `latest`, retention) several times. Between saves, the same number of bytes
is written to the same folder in 64 MB chunks and fsynced: the disk's sequential speed,
measured in the same run. Saves are synchronous, so a save's wall time is also the time the
training loop is blocked. Target: save throughput >= 0.5x the raw write.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/runs/quickstart.yaml")
    parser.add_argument("--saves", type=int, default=4, help="timed saves (and raw writes)")
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
    topology.destroy()
    shutil.rmtree(RUN_DIR, ignore_errors=True)


if __name__ == "__main__":
    main()
