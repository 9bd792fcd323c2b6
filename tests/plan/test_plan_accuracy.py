"""A small `benchmarks/plan_accuracy.py`: planned vs measured peak memory on 2 CPU ranks."""

from __future__ import annotations

from pathlib import Path

import pytest

from scaletrain.plan.accuracy import format_rows, measure_and_compare
from tests.distributed import TINY

# 6.6M parameters, activations about a third of the peak.
MODEL = [
    "model.hidden_size=384",
    "model.num_layers=4",
    "model.num_heads=6",
    "model.num_kv_heads=2",
    "model.ffn_hidden_size=1024",
    "model.max_seq_len=128",
    "train.seq_len=128",
    "train.micro_batch=2",
    "train.grad_accum=2",
    "train.global_batch=null",
    "checkpoint.resume=none",
    "checkpoint.save_at_end=false",
    "train.eval_interval=0",
    "fault.heartbeat_seconds=0",
    "optim.warmup_steps=0",
]
CASES = {
    "dp2z0": ["parallel.zero_stage=0"],
    "dp2z2": ["parallel.zero_stage=2"],
    "pp2z1": ["parallel.pp=2", "parallel.zero_stage=1"],
    "tp2z1-full": ["parallel.tp=2", "parallel.zero_stage=1", "model.activation_checkpointing=full"],
}
# Every layout's worst rank. Observed 10-13 % on an idle machine (docs/planning.md: accuracy);
# beside other jobs the measured peak moves with when transient buffers (ZeRO-2's gradient
# buckets, TP's communication) are freed: dp2z2 -9.4 to -21.7 %, tp2z1-full -11.4 to -27.5 %
# (the full CI run; two CPU hogs). The bound is above what load does, not above a wrong plan.
BOUND = 0.30


@pytest.mark.slow
def test_planned_peak_memory_within_bound(stdlib_data: Path, tmp_path: Path) -> None:
    overrides = [f"data.paths=[{stdlib_data}]", *MODEL]
    rows = measure_and_compare(tmp_path, str(TINY), overrides, CASES, 2)
    table = "\n".join(format_rows(rows))
    print(table)
    assert [r.name for r in rows] == list(CASES)
    assert all(abs(r.error) <= BOUND for r in rows), table
