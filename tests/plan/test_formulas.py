"""Each planner formula against a hand calculation, and the command's interface (in-process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from scaletrain.cli import main
from scaletrain.config.checks import check_config
from scaletrain.config.load import load_config
from scaletrain.plan import memory
from scaletrain.plan.flops import parameter_count
from scaletrain.plan.hardware import hardware_for_device, hardware_names, load_hardware
from scaletrain.plan.partition import balanced_blocks
from scaletrain.plan.planner import make_plan
from scaletrain.plan.search import search
from scaletrain.plan.timing import bubble_fraction, ring_allreduce_s, ring_gather_s
from tests.distributed import REPO

PSI = 1_000_000  # parameters of a hand example
RUN = str(REPO / "configs" / "runs" / "quickstart.yaml")


def _preset(name: str, *overrides: str) -> list[str]:
    return [f"model.base={name}", "data.paths=[]", "precision.dtype=bf16", *overrides]


def test_zero3_mixed_precision_states_are_20_psi_over_dp() -> None:
    # Textbook ZeRO-3: (2 weights + 2 grads + 12 Adam) * psi / dp = 16 psi / dp; DeepSpeed also
    # keeps the fp32 copy of the gradient partition it steps on: + 4 psi / dp.
    dp = 64
    params, grads, opt = memory.model_states(PSI, "bf16", 3, dp)
    assert (params, grads, opt) == (2 * PSI / dp, 6 * PSI / dp, 12 * PSI / dp)
    assert params + grads + opt == 20 * PSI / dp


@pytest.mark.parametrize(
    "dtype, zero, expected",
    [
        ("fp32", 0, (4, 4, 8)),  # no master copy: AdamW steps the fp32 weights themselves
        ("bf16", 0, (2, 6, 12)),
        ("fp16", 0, (2, 6, 12)),
        ("fp32", 1, (4, 4, 6)),  # dp = 2: gradient partition 4+4 over 2, master+moments 12 / 2
        ("bf16", 2, (2, 3, 6)),
        ("fp32", 3, (2, 4, 4)),  # the master is the weight partition itself
    ],
)
def test_model_states_per_parameter(dtype: str, zero: int, expected: tuple) -> None:
    assert memory.model_states(PSI, dtype, zero, 2) == tuple(float(b * PSI) for b in expected)


def test_pipeline_bubble_and_in_flight() -> None:
    assert bubble_fraction(4, 12) == pytest.approx(3 / 15)
    assert bubble_fraction(1, 7) == 0.0
    assert [memory.in_flight(4, s, 8) for s in range(4)] == [4, 3, 2, 1]
    assert [memory.in_flight(4, s, 2) for s in range(4)] == [2, 2, 2, 1]


def test_ring_collectives() -> None:
    # 1 GB over 8 ranks at 100 GB/s: an all-reduce moves 2 * 7/8 GB, a reduce-scatter 7/8 GB.
    assert ring_allreduce_s(1e9, 8, 100e9, 0.0) == pytest.approx(2 * 7 / 8 * 1e9 / 100e9)
    assert ring_gather_s(1e9, 8, 100e9, 0.0) == pytest.approx(7 / 8 * 1e9 / 100e9)
    assert ring_allreduce_s(1e9, 8, 100e9, 1e-5) == pytest.approx(0.0175 + 14e-5)
    assert ring_allreduce_s(1e9, 1, 100e9, 1e-5) == 0.0


def test_llama3_8b_per_rank_parameters_and_logits_by_hand() -> None:
    config = load_config(RUN, _preset("llama3-8b", "parallel.tp=8", "parallel.pp=4"))
    config.train.micro_batch, config.train.global_batch, config.train.seq_len = 1, 64, 8192
    resolved = check_config(config, 64, check_data=False)
    h, f, v, tp = 4096, 14336, 128256, 8
    block = (h * (32 + 16) * 128 + 32 * 128 * h) // tp + 3 * h * f // tp + 2 * h
    stages = memory.stage_params(config, resolved)
    assert [s.dense for s in stages] == [
        8 * block + v * h // tp,
        8 * block,
        8 * block,
        8 * block + h + v * h // tp,
    ]
    plan = make_plan(config, resolved, load_hardware("H100-SXM"))
    last = plan.stages[-1]
    assert last.logits_bytes == 8192 * (v // tp) * (4 + 2)  # fp32 softmax + bf16 logits
    assert [s.in_flight for s in plan.stages] == [4, 3, 2, 1]
    assert plan.stages[1].activation_bytes == 3 * memory.activation_bytes(
        config, resolved, range(8, 16), 1, "flash"
    )
    # Full recompute: every micro-batch in flight keeps each block's input (s x h in bf16);
    # the one block backward recomputes at a time exists once per stage, not per micro-batch.
    config.model.activation_checkpointing = "full"
    plan = make_plan(config, resolved, load_hardware("H100-SXM"))
    full_block = memory.block_activation_bytes(config, 1, tp, "flash")
    assert plan.stages[0].activation_bytes == 4 * 8 * (8192 * h * 2) + full_block
    assert plan.stages[3].activation_bytes == 1 * 8 * (8192 * h * 2) + full_block


def test_flash_attention_stores_no_score_matrix() -> None:
    config = load_config(RUN, _preset("llama3-8b"))
    flash = memory.block_activation_bytes(config, 1, 1, "flash")
    math = memory.block_activation_bytes(config, 1, 1, "math")
    s, heads = config.train.seq_len, 32
    assert math - flash == s * heads * s * (2 + 4) - s * heads * 4


def test_parameters_partition_follows_deepspeed() -> None:
    config = load_config(RUN, _preset("llama3-8b", "parallel.pipeline_partition=parameters"))
    blocks = balanced_blocks(config.model, 128256, 4)
    assert [len(b) for b in blocks] == [7, 9, 9, 7]  # embedding and head weigh ~1.3 blocks each
    assert blocks[0].start == 0 and blocks[-1].stop == 32


def test_hardware_table_loads_every_entry() -> None:
    names = hardware_names()
    assert {"A100-80GB", "H100-SXM", "H200", "B200", "MI300X", "cpu"} <= set(names)
    for name in names:
        hw = load_hardware(name, world_size=4)
        assert hw.peak_flops > 0 and hw.memory_bytes > 0 and 0 < hw.efficiency <= 1
    assert load_hardware("H100-SXM").memory_bytes == 80e9


def test_mfu_peak_is_the_hardware_entry_of_the_gpu_and_of_the_dtype() -> None:
    """MFU's peak comes from the planner's table, by the name CUDA gives the device."""
    from scaletrain.train.metrics import device_peak_flops

    names = {
        "NVIDIA H100 80GB HBM3": "H100-SXM",
        "NVIDIA A100-SXM4-80GB": "A100-80GB",
        "NVIDIA H200": "H200",
        "AMD Instinct MI300X": "MI300X",
        "NVIDIA L40S": None,  # not in the table: measured at start instead
    }
    assert {name: hardware_for_device(name) for name in names} == names
    h200 = load_hardware("H200")
    assert (h200.peak_flops, h200.fp32_flops) == (989e12, 67e12)
    cpu = torch.device("cpu")
    assert device_peak_flops(cpu, 100.0, "bf16") == 100e12  # logging.peak_tflops wins


def test_json_keys(capsys: pytest.CaptureFixture) -> None:
    args = ["plan", "--config", RUN, "--world-size", "64", "--json", "--tokens", "1e12"]
    assert main(args + _preset("llama3-8b", "parallel.tp=8", "train.global_batch=64")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["world_size"] == 64
    assert set(out["layout"]) == {
        "tp", "pp", "dp", "ep", "zero_stage", "micro_batch", "grad_accum",
        "activation_checkpointing",
    }  # fmt: skip
    assert set(out["parameters"]) == {"total", "active"}
    assert {"device_bytes", "fits", "stages"} <= set(out["memory"])
    stage_keys = {
        "stage", "params_bytes", "grads_bytes", "optimizer_bytes", "activation_bytes",
        "buffer_bytes", "overhead_bytes", "total_bytes",
    }  # fmt: skip
    assert stage_keys <= set(out["memory"]["stages"][0])
    time_keys = {"flops_per_step", "step_time_s", "tokens_per_sec", "mfu", "wall_time_s"}
    assert time_keys | {"compute_s", "dp_grad_sync_s", "pipeline_bubble_s"} <= set(out["time"])
    t = out["time"]
    assert t["step_time_s"] == pytest.approx(
        sum(v for k, v in t.items() if k.endswith("_s") and k not in ("step_time_s", "wall_time_s"))
    )
    assert t["gpu_hours"] == pytest.approx(1e12 / t["tokens_per_sec"] * 64 / 3600)


def test_bad_layout_is_one_line_exit_2(capsys: pytest.CaptureFixture) -> None:
    args = ["plan", "--config", RUN, "--world-size", "64", *_preset("llama3-8b", "parallel.tp=3")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == (
        "config error: parallel: world size (64) is not divisible by tp (3) * pp (1); change "
        "tp/pp or the number of ranks\n"
    )


def test_search_16384_every_candidate_fits_and_is_ranked() -> None:
    # Its speed (target < 5 s) is measured by benchmarks/plan_search.py, not asserted here.
    overrides = _preset("llama3-405b", "parallel.tp=8", "parallel.pp=16")
    overrides.append("parallel.pipeline_partition=parameters")  # 126 blocks on 16 stages
    config = load_config(RUN, [*overrides, "train.micro_batch=1", "train.global_batch=2048"])
    resolved = check_config(config, 16384, check_data=False)
    hw = load_hardware("H100-SXM")
    plans, checked, refused = search(config, resolved, 16384, hw)
    assert plans and checked > refused
    assert all(p.fits and p.resolved.global_batch == 2048 for p in plans)
    speeds = [p.tokens_per_sec for p in plans]
    assert speeds == sorted(speeds, reverse=True)


def test_plan_imports_neither_deepspeed_nor_megatron() -> None:
    code = (
        "import sys; from scaletrain.cli import main; "
        f"rc = main(['plan', '--config', {RUN!r}, '--world-size', '8', 'model.base=llama3-8b', "
        "'data.paths=[]', 'parallel.tp=8']); "
        "assert rc == 0 and not {'deepspeed', 'megatron'} & set(sys.modules), sorted(sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_cluster_file_names_gpu_and_ranks_per_node(tmp_path, capsys) -> None:
    cluster = tmp_path / "c.yaml"
    cluster.write_text("partition: p\ngpu: H200\ngpus_per_node: 4\n")
    args = ["plan", "--config", RUN, "--world-size", "8", "--cluster", str(cluster), "--json"]
    shape = ["train.micro_batch=1", "train.seq_len=2048"]
    assert main(args + _preset("llama3-8b", "parallel.tp=8", "train.global_batch=8", *shape)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpu"] == "H200" and out["memory"]["device_bytes"] == 141e9
    # tp 8 spans two 4-GPU nodes: its all-reduces run at the inter-node bandwidth.
    hw = load_hardware("H200", gpus_per_node=4)
    activation = 1 * 2048 * 4096 * 2  # micro-batch x seq x hidden x bf16
    per_call = ring_allreduce_s(activation, 8, hw.inter_node_bw * hw.comm_efficiency, 10e-6)
    # 32 blocks x 8 micro-batches (grad_accum) x 4 all-reduces per block
    assert out["time"]["tp_allreduce_s"] == pytest.approx(32 * 8 * 4 * per_call)
    # --gpu beats the cluster's gpu and keeps its gpus_per_node; --search --json adds the
    # candidates, each one object of the same keys, best first, every one fitting.
    more = ["--gpu", "B200", "--search", "--top", "2"]
    assert main(args + more + _preset("llama3-8b", "parallel.tp=8", "train.global_batch=8")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpu"] == "B200" and out["memory"]["device_bytes"] == 180e9
    candidates = out["candidates"]
    assert len(candidates) == 2 and all(c["memory"]["fits"] for c in candidates)
    assert candidates[0]["time"]["tokens_per_sec"] >= candidates[1]["time"]["tokens_per_sec"]
    assert set(candidates[0]) == set(out) - {"candidates", "search"}
    assert out["search"]["fitting"] >= 2 and out["search"]["checked"] > out["search"]["refused"]


def test_text_plan_prints_every_term_and_the_search_reason(capsys) -> None:
    args = ["plan", "--config", RUN, "--world-size", "64", "--search", "--top", "3"]
    args += _preset("llama3-8b", "parallel.zero_stage=3", "train.seq_len=8192")
    assert main([*args, "train.micro_batch=1", "train.global_batch=512"]) == 0
    out = capsys.readouterr().out.splitlines()
    terms = ["compute", "recompute", "tp_allreduce", "pipeline_bubble", "pipeline_send"]
    terms += ["dp_grad_sync", "zero3_allgather", "moe_alltoall"]
    for term in terms:
        assert sum(line.split()[:1] == [term] for line in out) == 1, term
    assert "  per-process overhead (in every total): 2.00 GB" in out
    assert sum(line.startswith(("  1. ", "  2. ", "  3. ")) for line in out) == 3
    assert out[-1].startswith("best vs the config's layout: ")


@pytest.mark.parametrize(
    ("preset", "total", "active"),
    [  # the exact parameter counts of the Hugging Face checkpoints these shapes come from
        ("llama3-8b", 8_030_261_248, 8_030_261_248),
        ("llama3-70b", 70_553_706_496, 70_553_706_496),
        ("llama3-405b", 405_853_388_800, 405_853_388_800),
        ("mixtral-8x7b", 46_702_792_704, 12_879_925_248),
        ("mixtral-8x22b", 140_630_071_296, 39_161_468_928),
    ],
)
def test_presets_have_their_published_parameter_counts(preset: str, total: int, active: int):
    config = load_config(RUN, _preset(preset))
    vocab = check_config(config, 2, check_data=False).padded_vocab_size
    assert vocab == config.model.vocab_size  # no padding for these vocabularies
    counts = parameter_count(config.model, vocab), parameter_count(config.model, vocab, True)
    assert counts == (total, active)
