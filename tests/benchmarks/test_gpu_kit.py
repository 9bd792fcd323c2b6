"""The GPU kit (benchmarks/gpu/) on the CPU: its dry run, its wheel list, its baseline model and
its result table, so that the one GPU session it is made for finds it working."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from packaging.requirements import Requirement
from torch.utils.flop_counter import FlopCounterMode

from scaletrain.config import check_config, load_config
from scaletrain.plan.flops import flops_per_token, parameter_count

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / "benchmarks" / "gpu"
CONFIG = str(KIT / "llama-1b-h200.yaml")


def _script(name: str) -> ModuleType:
    """One of the kit's scripts as a module of its own name (no sys.path entry for them)."""
    spec = importlib.util.spec_from_file_location(f"gpu_kit_{name}", KIT / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


plain_loop, table, wheel_list = _script("plain_loop"), _script("table"), _script("wheel_list")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    work = tmp_path_factory.mktemp("gpu-kit")
    env = {**os.environ, "GPU_KIT_WORK": str(work), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(KIT / "run.sh"), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done, work


def test_dry_run_checks_configs_and_wheels_and_lists_the_steps(dry_run) -> None:
    done, work = dry_run
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    accepted = "ok: tp1pp1dp1 on 1 rank(s), global batch 8 = micro 8 x accum 1 x dp 1, vocab 32000"
    for mode in ("none", "full"):
        assert any(
            line.startswith(f"config check activation_checkpointing={mode}: {accepted}")
            for line in lines
        )
        assert any(
            line.startswith(f"plan activation_checkpointing={mode}: 1.138B parameters")
            for line in lines
        )
    planned = [line for line in lines if line.startswith("planned step ")]
    assert [line.split(":")[0] for line in planned] == [f"planned step {i}/5" for i in range(1, 6)]
    assert "bf16 at seq 2048 on CUDA + nccl, world size 1, ZeRO-0, 30 steps" in planned[0]
    assert "plain PyTorch loop" in planned[1] and "scaletrain plan --json" in planned[2]
    assert "activation checkpointing full vs none" in planned[3] and ">= 2 GPUs" in planned[4]
    carried = next(line for line in lines if line.startswith("wheels to carry: ")).split()[3:]
    version = importlib.metadata.version
    for name in ("deepspeed", "megatron-core", "pydantic"):
        assert f"{name}=={version(name)}" in carried
    assert not any(c.startswith("torch==") for c in carried)
    assert lines[-1] == "dry run ok: nothing was trained"
    plans = {m: json.loads((work / f"plan-{m}.json").read_text()) for m in ("none", "full")}
    act = {m: p["memory"]["stages"][0]["activation_bytes"] for m, p in plans.items()}
    assert act["full"] < act["none"] / 4  # recomputing every block keeps only block inputs


def test_wheel_list_carries_what_the_machine_lacks_and_walks_its_needs() -> None:
    class Dist:
        def __init__(self, version: str, requires: list[str]) -> None:
            self.version, self.requires = version, requires

    local = {
        "app": Dist(
            "1.0", ["lib>=2", "present-ok", "needs-new>=3", "wandb", "win; sys_platform == 'win32'"]
        ),
        "lib": Dist("2.1", ["deep==0.5"]),
        "deep": Dist("0.5", []),
        "needs-new": Dist("3.2", []),
    }
    machine = {"present-ok": None, "needs-new": "2.0", "deep": None}
    decided = wheel_list.plan_wheels(machine, [Requirement("app")], lambda n: local[n])
    lines = sorted(d.line() for d in decided.values())
    assert lines == [
        "carry app==1.0",
        "carry lib==2.1",
        "carry needs-new==3.2",  # the machine has 2.0, app needs >= 3
        "present deep (machine: version not listed)",
        "present present-ok (machine: version not listed)",
        "skip wandb (only logging.wandb=true imports it)",
    ]
    # The project's own list against the recorded machine: exactly these are missing there.
    project = wheel_list.plan_wheels(
        wheel_list.read_machine(wheel_list.MACHINE_FILE), wheel_list.project_requirements()
    )
    assert sorted(n for n, d in project.items() if d.action == "carry") == [
        "annotated-types",
        "datasets",
        "deepspeed",
        "dill",
        "hjson",
        "megatron-core",
        "multiprocess",
        "pydantic",
        "pydantic-core",
        "typing-inspection",
    ]
    assert project["torch"].action == "skip"


def llama_1b():
    config = load_config(CONFIG, ["data.paths=[]"])
    return config, check_config(config, world_size=1, check_data=False)


def test_plain_model_has_scaletrains_parameters_and_flops_for_llama_1b() -> None:
    config, resolved = llama_1b()
    vocab = resolved.padded_vocab_size
    model = plain_loop.PlainLlama(config.model, vocab, "meta")
    assert sum(p.numel() for p in model.parameters()) == parameter_count(config.model, vocab)
    assert parameter_count(config.model, vocab) == 1_137_772_544
    window = torch.zeros((1, config.train.seq_len + 1), dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(window).backward()
    per_token = flops_per_token(config.model, config.train.seq_len, vocab)
    assert counter.get_total_flops() == per_token * config.train.seq_len


def test_plain_model_computes_scaletrains_loss(tensor_parallel) -> None:
    """A small model of llama-1b's layout (GQA 2:1): scaletrain's GPT's weights copied by name
    into the plain model give the same loss and the same gradients."""
    from scaletrain.models.gpt import GPT

    config = load_config(
        CONFIG,
        [
            "model.hidden_size=64",
            "model.num_layers=2",
            "model.num_heads=4",
            "model.num_kv_heads=2",
            "model.ffn_hidden_size=96",
            "model.vocab_size=256",
            "model.max_seq_len=32",
        ],
    )
    torch.manual_seed(0)
    ours = GPT(config.model, 256, tensor_parallel)
    plain = plain_loop.PlainLlama(config.model, 256)
    theirs = dict(ours.named_parameters())
    mine = dict(plain.named_parameters())
    assert sorted(theirs) == sorted(mine)
    with torch.no_grad():
        for name, param in mine.items():
            param.copy_(theirs[name])
    window = torch.randint(0, 256, (2, 33))
    loss_ours, loss_plain = ours(window), plain(window)
    loss_ours.backward()
    loss_plain.backward()
    assert abs(loss_ours.item() - loss_plain.item()) < 1e-6
    for name, param in mine.items():
        torch.testing.assert_close(param.grad, theirs[name].grad, rtol=1e-4, atol=1e-6)


def test_plain_loop_trains_with_master_weights(stdlib_data: Path) -> None:
    config = load_config(
        CONFIG,
        [
            "model.hidden_size=64",
            "model.num_layers=2",
            "model.num_heads=4",
            "model.num_kv_heads=2",
            "model.ffn_hidden_size=128",
            "model.vocab_size=512",
            "model.max_seq_len=64",
            "train.seq_len=64",
            "train.steps=8",
            "train.micro_batch=4",
            "train.global_batch=4",
            "optim.lr=1e-2",
            "optim.warmup_steps=2",
            f"data.paths=[{stdlib_data}]",
        ],
    )
    resolved = check_config(config, world_size=1)
    result = plain_loop.train(config, resolved, torch.device("cpu"))
    losses = [s["loss"] for s in result["steps"]]
    assert [s["step"] for s in result["steps"]] == list(range(1, 9))
    assert losses[0] > 6.0  # ln(512) = 6.24 from random weights
    assert losses[-1] < losses[0] - 0.3
    assert result["parameters"] == parameter_count(config.model, resolved.padded_vocab_size)
    assert result["tokens_per_step"] == 4 * 64


def test_table_reports_mfu_ratio_and_memory_against_the_targets(dry_run) -> None:
    _, work = dry_run
    config, resolved = llama_1b()
    tokens = 8 * 2048
    per_token = flops_per_token(config.model, 2048, resolved.padded_vocab_size)
    probe = {
        "device": "NVIDIA H200",
        "gpus": 1,
        "torch": "2.11.0",
        "cuda": "13.0",
        "gemm_bf16_tflops": 800.0,
        "sdpa_default_kernel": "aten::_scaled_dot_product_flash_attention",
        "sdpa_flash_takes_call": True,
    }
    (work / "probe.json").write_text(json.dumps(probe))
    plan_none = table.plan_tensor_bytes(json.loads((work / "plan-none.json").read_text()))

    def run(mode: str, times: list[float], peak: float) -> list[dict]:
        steps = [
            {"step": i + 1, "loss": 10.0 - i * 0.1, "step_time": t, "peak_mem_bytes": peak}
            for i, t in enumerate(times)
        ]
        (work / mode).mkdir(exist_ok=True)
        (work / mode / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
        return steps

    run("none", [2.0] * 5 + [0.30, 0.31, 0.29], 1.05 * plan_none)
    run("full", [2.0] * 3 + [0.40], 10e9)
    steps = [{"step": i + 1, "loss": 10.0, "step_time": t} for i, t in enumerate([1.0] * 5 + [0.3])]
    (work / "plain.json").write_text(json.dumps({"steps": steps, "peak_mem_bytes": 5e10}))
    rows, numbers = table.build(work, CONFIG, skip=5)
    found = {name: (value, target) for name, value, target in rows}
    mfu = per_token * tokens / 0.30 / 800e12
    assert found["MFU vs measured GEMM peak"] == (f"{100 * mfu:.1f} %", "≥ 45 %: met")
    assert found["step-time ratio scaletrain / plain"] == ("1.000x", "≤ 1.05x: met")
    value, target = found["peak memory, activation checkpointing none"]
    assert value.endswith(": +5.0 %") and target == "within 10 %: met"
    assert found["scaletrain loss, step 1 → 8"] == ("10.000 → 9.300", "falls: met")
    assert found["TP2 / ZeRO on 2 GPUs"] == ("skipped: 1 GPU visible", "needs ≥ 2")
    assert numbers["full"]["step_time"] == 0.40
    assert table.markdown(rows).splitlines()[0] == "| measurement | value | target |"
    (work / "plain.json").unlink()  # a failed step leaves a row saying so, not a traceback
    found = {name: (value, target) for name, value, target in table.build(work, CONFIG, 5)[0]}
    assert found["plain PyTorch loop"] == ("not measured (see kit.log)", "")
    assert "step-time ratio scaletrain / plain" not in found


def test_device_choice_on_a_gpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA + nccl where a GPU is present, unless DS_ACCELERATOR=cpu keeps the run on the CPU."""
    from scaletrain.topology import init

    picked: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", picked.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert init.select_device() == (torch.device("cpu"), "gloo")
    monkeypatch.delenv("DS_ACCELERATOR")
    assert init.select_device() == (torch.device("cuda", 1), "nccl")
    assert picked == [1]
    assert "DS_ACCELERATOR" not in os.environ  # DeepSpeed detects its CUDA accelerator itself


def test_rotary_tables_are_copied_to_a_device_once() -> None:
    from scaletrain.models.layers import Rotary

    rotary = Rotary(16, 32, 10000.0)
    meta = torch.device("meta")
    first = rotary.tables(meta)
    assert first[0].device == meta and first[0].dtype == torch.float32
    assert rotary.tables(meta)[0] is first[0]
    assert rotary.tables(torch.device("cpu"))[0] is rotary.cos
