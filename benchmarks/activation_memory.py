"""Peak memory and time of one forward+backward with and without activation checkpointing.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/activation_memory.py [--micro-batch 4] [...]

One rank (TP1, fp32), a model whose activations dominate its weights (512d x 8 layers,
seq 1024 by default). Each mode (none, every_n with n=2, full) runs in its own process,
because on the CPU the only peak we can read is the RSS high-water mark, which never goes
down. Each process builds the model, runs a small warm-up step (kernels, allocator, gradient
buffers), then one timed forward+backward of the real batch; "peak extra" is the high-water
mark after that step minus the resident size just before it: the activations that step kept.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

MODES = {
    "none": ["model.activation_checkpointing=none"],
    "every_n": ["model.activation_checkpointing=every_n", "model.activation_checkpointing_every=2"],
    "full": ["model.activation_checkpointing=full"],
}
MODEL = [
    "model.hidden_size=512",
    "model.num_layers=8",
    "model.num_heads=8",
    "model.num_kv_heads=null",
    "model.ffn_hidden_size=null",
    "model.max_seq_len=1024",
    "model.vocab_size=512",
    "parallel.tp=1",
    "precision.dtype=fp32",
]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(overrides: list[str], micro_batch: int, seq_len: int) -> dict:
    """In this process: one forward+backward; returns peak extra bytes and seconds."""
    import torch

    from scaletrain.config import check_config, load_config
    from scaletrain.models.gpt import GPT
    from scaletrain.models.parallel import TensorParallel
    from scaletrain.topology.init import init_topology, seed_everything

    config = load_config(None, [*MODEL, f"train.seq_len={seq_len}", *overrides])
    resolved = check_config(config, world_size=1, check_data=False)
    topology = init_topology(resolved.dims)
    seed_everything(config.train.seed)
    model = GPT(config.model, resolved.padded_vocab_size, TensorParallel(1, None)).train()
    vocab = resolved.vocab_size

    # Warm-up on a small batch: allocates the gradients and loads every kernel.
    model(torch.randint(0, vocab, (1, 65))).backward()
    model.zero_grad(set_to_none=False)

    window = torch.randint(0, vocab, (micro_batch, seq_len + 1))
    before = _rss_bytes()
    start = time.perf_counter()
    model(window).backward()
    seconds = time.perf_counter() - start
    peak_extra = _max_rss_bytes() - before
    topology.destroy()
    params = sum(p.numel() for p in model.parameters())
    return {"peak_extra": peak_extra, "seconds": seconds, "params": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. model.num_layers=4")
    args = parser.parse_args()
    if args.child:
        result = measure([*MODES[args.child], *args.overrides], args.micro_batch, args.seq_len)
        print(json.dumps(result))
        return

    results = {}
    for mode in MODES:
        command = [
            sys.executable,
            __file__,
            "--child",
            mode,
            f"--micro-batch={args.micro_batch}",
            f"--seq-len={args.seq_len}",
            *args.overrides,
        ]
        repo = Path(__file__).resolve().parent.parent
        done = subprocess.run(command, cwd=repo, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"{mode} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])

    params = results["none"]["params"]
    tokens = args.micro_batch * args.seq_len
    print(f"model: {params / 1e6:.1f}M parameters, {tokens} tokens per forward+backward (fp32)")
    print(f"{'mode':<10}{'peak extra (MB)':>17}{'step (s)':>10}{'memory / none':>15}")
    base = results["none"]["peak_extra"]
    for mode, r in results.items():
        mb = r["peak_extra"] / 2**20
        print(f"{mode:<10}{mb:>17.0f}{r['seconds']:>10.2f}{r['peak_extra'] / base:>15.2f}")


if __name__ == "__main__":
    main()
