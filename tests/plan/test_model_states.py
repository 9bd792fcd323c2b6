"""Model states: the planner against DeepSpeed's own estimators and against bytes measured on
two CPU ranks (ZeRO 0-3 x fp32/bf16/fp16, all in one torchrun).

Measured = live tensor bytes (torch.profiler memory events, not the resident set) when the
optimizer's step begins on the second step, the lower of the two data-parallel ranks. At that
moment DeepSpeed's buffers are in part still allocated, how much varies from run to run: for
ZeRO 0-2 the gradient bucket (here the whole model's gradients, in the model dtype) is either
freed or not; at ZeRO-3 its gathered weights, their gradients and the bucket are partly freed
(fp32: from 24.1 to 34.6 MB in six runs of one case, i.e. up to 9 % above planned states +
buffers). The bound: planned states <= measured <= planned states + planned buffers, each end
within 1 % (ZeRO-3: the upper end within 15 %). In most runs most ZeRO 0-2 cases sit within
0.1 % of planned states, but a partly freed bucket also occurs (bf16 ZeRO-1: +2.5 %, once),
and ZeRO-2 once held a second bucket (bf16: planned states + buffers + 15.4 %, exactly one more
bucket of 2,886,144 bytes, in a full-suite run on a loaded machine; fp32 ZeRO-1 once too, in a
clean-clone CI run: 31,745,568 bytes = states + two buckets): its upper end allows two at ZeRO 1-2.
DeepSpeed 0.19.8's code holds one: `setup_buckets` (stage_1_and_2.py) allocates one
`reduce_bucket_size` buffer per communication dtype and a second only with `overlap_comm`, which
our ds_config leaves at DeepSpeed's default (on for stage 3 only, zero/config.py
`overlap_comm_valid`); the pipeline engine's `reduce_gradients(pipeline_parallel=True)` appends
another (the planner's two buckets under PP). So the planner counts one at ZeRO-2, and the
second seen once is a transient (most likely an earlier buffer still referenced when the step
began), which the upper end tolerates rather than the planner predicting it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from scaletrain.config.checks import check_config
from scaletrain.config.load import load_config
from scaletrain.plan.hardware import load_hardware
from scaletrain.plan.memory import buffer_bytes, model_states, stage_params, states_at_step
from scaletrain.plan.planner import make_plan
from tests.distributed import REPO, TINY, torchrun

# A block large enough that tensors dominate: 1,443,072 parameters (1.2M in the blocks).
MODEL = [
    "model.hidden_size=256",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.ffn_hidden_size=512",
    "train.micro_batch=2",
    "train.global_batch=4",
    "train.seq_len=32",
    "checkpoint.resume=none",
    "checkpoint.save_at_end=false",
    "train.eval_interval=0",
    "fault.heartbeat_seconds=0",
    "optim.warmup_steps=0",
]
TOLERANCE = 0.01
ZERO3_SLACK = 0.15  # see the module docstring


def _dtypes() -> list[str]:
    import torch

    # DeepSpeed's CPU accelerator takes fp16 only where oneDNN has fp16 kernels.
    fp16 = torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return ["fp32", "bf16"] + (["fp16"] if fp16 else [])


@pytest.mark.slow
def test_model_states_match_measured_bytes(stdlib_data: Path, tmp_path: Path) -> None:
    base = [f"data.paths=[{stdlib_data}]", *MODEL]
    cases = [
        {
            "name": f"{dtype}z{zero}",
            "overrides": [
                f"precision.dtype={dtype}",
                f"parallel.zero_stage={zero}",
                f"train.run_dir={tmp_path / f'{dtype}z{zero}'}",
            ],
        }
        for dtype in _dtypes()
        for zero in range(4)
    ]
    spec, result = tmp_path / "cases.json", tmp_path / "result.json"
    spec.write_text(json.dumps({"config": str(TINY), "overrides": base, "cases": cases}))
    torchrun(2, "-m", "scaletrain.plan.measure", str(spec), str(result), timeout=900)
    rows = []
    for case in json.loads(result.read_text()):
        config = load_config(TINY, base + case["overrides"])
        resolved = check_config(config, 2)
        (stage,) = stage_params(config, resolved)
        dtype, zero = config.precision.dtype, config.parallel.zero_stage
        states = sum(states_at_step(stage.dense, dtype, zero, 2))
        # The plan's buffers with no activations beside them: ZeRO-0's flat gradients, the
        # ZeRO-1/2 bucket, ZeRO-3's bucket + gathered weights + their gradients.
        buffers = buffer_bytes(config, resolved, stage, 0.0)
        measured = min(rank["states_bytes"] for rank in case["ranks"])
        rows.append((case["name"], zero, states, buffers, measured))
    print(
        "\n".join(
            f"{r[0]}: states {r[2]:,.0f} buffers {r[3]:,.0f} measured {r[4]:,.0f}" for r in rows
        )
    )
    for name, zero, states, buffers, measured in rows:
        slack = ZERO3_SLACK if zero == 3 else TOLERANCE
        buckets = 2 if zero in (1, 2) else 1  # one stage_1_and_2 code path: same transient
        low, high = states * (1 - TOLERANCE), (states + buckets * buffers) * (1 + slack)
        assert low <= measured <= high, (name, rows)


def _estimator_table(out: str) -> dict[str, float]:
    """Options -> per-GPU GiB from DeepSpeed's printed table."""
    rows = re.findall(r"\|\s+([\d.]+)GB \| (.+)", out)
    return {options.strip(): float(gib) for gib, options in rows}


@pytest.mark.slow
def test_deepspeed_estimators(capsys: pytest.CaptureFixture) -> None:
    """At Llama-3-8B scale on 64 GPUs (ZeRO over dp = 64, bf16): ZeRO-2 equals DeepSpeed's
    estimate exactly; ZeRO-3 differs by what the estimator books elsewhere."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs_all_cold,
    )

    config = load_config(
        REPO / "configs" / "runs" / "quickstart.yaml",
        ["model.base=llama3-8b", "data.paths=[]", "precision.dtype=bf16", "train.global_batch=512"],
    )
    psi = 8_030_261_248
    largest = 128256 * 4096  # the embedding (or the head)
    gib = 2**30
    zero2 = sum(model_states(psi, "bf16", 2, 64))
    assert zero2 == 2 * psi + 18 * psi / 64  # DeepSpeed: 2 bytes + 18 / N per parameter
    estimate_zero2_model_states_mem_needs_all_cold(psi, num_gpus_per_node=8, num_nodes=8)
    assert _estimator_table(capsys.readouterr().out)["offload_optimizer=none"] == round(
        zero2 / gib, 2
    )
    # ZeRO-3: DeepSpeed estimates 4 * largest layer + 18 / N; what it allocates (measured above)
    # also keeps the 16-bit weight partition (2 / N) and gathers layers in the model dtype, which
    # the planner counts under buffers.
    zero3 = sum(model_states(psi, "bf16", 3, 64))
    assert zero3 == 20 * psi / 64
    estimate_zero3_model_states_mem_needs_all_cold(psi, largest, num_gpus_per_node=8, num_nodes=8)
    table = _estimator_table(capsys.readouterr().out)
    deepspeed = table["offload_param=none, offload_optimizer=none, zero_init=1"]
    assert deepspeed == round((zero3 - 2 * psi / 64 + 4 * largest) / gib, 2)
    resolved = check_config(config, 64, check_data=False)
    config.parallel.zero_stage = 3
    plan = make_plan(config, check_config(config, 64, check_data=False), load_hardware("H100-SXM"))
    assert plan.stages[0].states_bytes == pytest.approx(zero3, rel=1e-3)  # + norms, padding
    assert resolved.dims.dp == 64
