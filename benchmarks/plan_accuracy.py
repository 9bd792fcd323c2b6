"""How close `scaletrain plan` comes to the memory real training steps use, per rank.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/plan_accuracy.py [--steps 3] [--out DIR]

Ten layouts of a 51M-parameter model (768 wide, 8 blocks, seq 256) on 4 CPU ranks, all in one
torchrun (`scaletrain.plan.measure`): tp2, pp2, dp4 with ZeRO 0-3, tp2 x pp2, MoE with ep2,
full recompute, every_n recompute. Measured = each rank's peak of live tensor bytes
(torch.profiler memory events, not the resident set); planned = the plan's total for the
rank's stage without the per-process overhead. Prints the table and, last, the worst error.
Takes ~8.5 minutes on 2 shared cores (last run: worst error 7.4 %).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scaletrain.plan.accuracy import format_rows, measure_and_compare  # noqa: E402

WORLD = 4
MODEL = [
    "model.hidden_size=768",
    "model.num_layers=8",
    "model.num_heads=12",
    "model.num_kv_heads=4",
    "model.ffn_hidden_size=2048",
    "model.max_seq_len=256",
    "model.tie_embeddings=false",
    "train.seq_len=256",
    "train.micro_batch=2",
    "train.grad_accum=2",
    "train.global_batch=null",
    "precision.dtype=fp32",
    "checkpoint.resume=none",
    "checkpoint.save_at_end=false",
    "train.eval_interval=0",
    "fault.heartbeat_seconds=0",
    "optim.warmup_steps=0",
]
MOE = ["model.num_experts=4", "model.moe_top_k=2", "model.moe_capacity_factor=2.0"]
CASES = {
    "tp2dp2z1": ["parallel.tp=2", "parallel.zero_stage=1"],
    "pp2dp2z1": ["parallel.pp=2", "parallel.zero_stage=1"],
    "dp4z0": ["parallel.zero_stage=0"],
    "dp4z1": ["parallel.zero_stage=1"],
    "dp4z2": ["parallel.zero_stage=2"],
    "dp4z3": ["parallel.zero_stage=3"],
    "tp2pp2z1": ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"],
    "dp4ep2z1-moe": ["parallel.ep=2", "parallel.zero_stage=1", *MOE],
    "dp4z1-full": ["parallel.zero_stage=1", "model.activation_checkpointing=full"],
    "dp4z1-every2": [
        "parallel.zero_stage=1",
        "model.activation_checkpointing=every_n",
        "model.activation_checkpointing_every=2",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    from scaletrain.data import prepare_dataset, stdlib_sources

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        data = out / "data"
        if not (data / "metadata.json").exists():
            prepare_dataset(
                stdlib_sources()[:40], data, vocab_size=512, val_fraction=0.1, num_proc=1
            )
        overrides = [f"data.paths=[{data}]", *MODEL]
        config = str(REPO / "configs" / "runs" / "tiny.yaml")
        print(
            "\n".join(
                format_rows(measure_and_compare(out, config, overrides, CASES, WORLD, args.steps))
            )
        )


if __name__ == "__main__":
    main()
