"""The GPU kit's result: one markdown table from the files run.sh left in its work folder.

    python3 benchmarks/gpu/table.py --work runs/gpu-kit --config benchmarks/gpu/llama-1b-h200.yaml \
        --md runs/gpu-kit/gpu-kit.md --json runs/gpu-kit/results.json

Reads probe.json (measured GEMM peak, SDPA kernel), plan-<mode>.json (`scaletrain plan --json`),
<mode>/metrics.jsonl (the scaletrain runs, mode = none / full activation checkpointing, tp2,
zero1) and plain.json (benchmarks/gpu/plain_loop.py). Step times are medians over the steps
after --skip warm-up steps; MFU counts the model's FLOPs only (no recompute), as the trainer's.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from scaletrain.config import check_config, load_config
from scaletrain.plan.flops import flops_per_token
from scaletrain.plan.hardware import load_hardware

TARGET_MFU, TARGET_RATIO, TARGET_MEMORY = 0.45, 1.05, 0.10


def read_steps(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steady(steps: list[dict[str, Any]], skip: int) -> float:
    """Median step time after the warm-up steps (all of them if the run was shorter)."""
    times = [s["step_time"] for s in steps if s["step"] > skip] or [s["step_time"] for s in steps]
    return statistics.median(times)


def plan_tensor_bytes(plan: dict[str, Any]) -> float:
    """The planner's bytes that torch's allocator holds (its total less the per-process
    overhead: CUDA context, NCCL buffers, ... which max_memory_allocated does not see)."""
    stage = max(plan["memory"]["stages"], key=lambda s: s["total_bytes"])
    return stage["total_bytes"] - stage["overhead_bytes"]


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def _load(path: Path) -> Any:
    """A JSON or JSONL result, or None where that step failed or did not run."""
    if not path.exists():
        return None
    return read_steps(path) if path.suffix == ".jsonl" else json.loads(path.read_text())


MISSING = "not measured (see kit.log)"


def build(work: Path, config_path: str, skip: int) -> tuple[list[tuple[str, str, str]], dict]:
    """Rows (measurement, value, target and verdict) and every number behind them; a step
    that left no result gets a row saying so instead of stopping the table."""
    config = load_config(config_path, ["data.paths=[]"])
    resolved = check_config(config, world_size=1, check_data=False)
    fpt = flops_per_token(config.model, config.train.seq_len, resolved.padded_vocab_size)
    tokens = resolved.global_batch * config.train.seq_len
    datasheet = load_hardware("H200").peak_flops
    probe = _load(work / "probe.json")
    none, full = _load(work / "none" / "metrics.jsonl"), _load(work / "full" / "metrics.jsonl")
    plain = _load(work / "plain.json")
    numbers: dict[str, Any] = {"probe": probe, "flops_per_token": fpt, "tokens_per_step": tokens}
    rows: list[tuple[str, str, str]] = []
    if probe:
        measured_peak = probe["gemm_bf16_tflops"] * 1e12
        gpu = f"{probe['device']} x {probe['gpus']}, torch {probe['torch']}, CUDA {probe['cuda']}"
        kernel = (
            f"{probe['sdpa_default_kernel']} (flash takes it: {probe['sdpa_flash_takes_call']})"
        )
        rows += [
            ("GPU", gpu, ""),
            ("bf16 GEMM peak, 8192³ measured", f"{measured_peak / 1e12:.0f} TFLOP/s", ""),
            ("SDPA kernel for the model's attention", kernel, "flash"),
        ]
    else:
        measured_peak = math.nan
        rows.append(("GPU probe", MISSING, ""))
    rows.append(
        ("bf16 peak, datasheet (hardware.yaml H200)", f"{datasheet / 1e12:.0f} TFLOP/s", "")
    )
    t_none = steady(none, skip) if none else math.nan
    if none:
        mfu = fpt * tokens / t_none / measured_peak
        loss = f"{none[0]['loss']:.3f} → {none[-1]['loss']:.3f}"
        falls = none[-1]["loss"] < none[0]["loss"]
        rows += [
            (f"scaletrain loss, step 1 → {none[-1]['step']}", loss, f"falls: {verdict(falls)}"),
            (
                f"scaletrain step time (median after step {skip})",
                f"{t_none * 1e3:.1f} ms, {tokens / t_none:,.0f} tokens/s",
                "",
            ),
            (
                "MFU vs measured GEMM peak",
                f"{100 * mfu:.1f} %",
                f"≥ 45 %: {verdict(mfu >= TARGET_MFU)}",
            ),
            ("MFU vs datasheet peak", f"{100 * fpt * tokens / t_none / datasheet:.1f} %", ""),
        ]
        numbers["none"] = {"step_time": t_none, "mfu_measured": mfu}
        numbers["none"]["losses"] = [s["loss"] for s in none]
    else:
        rows.append(("scaletrain run, activation checkpointing none", MISSING, ""))
    if plain:
        t_plain = steady(plain["steps"], skip)
        ratio = t_none / t_plain
        loss = f"loss {plain['steps'][0]['loss']:.3f} → {plain['steps'][-1]['loss']:.3f}"
        rows += [
            ("plain PyTorch loop step time", f"{t_plain * 1e3:.1f} ms ({loss})", ""),
            (
                "step-time ratio scaletrain / plain",
                f"{ratio:.3f}x",
                f"≤ 1.05x: {verdict(ratio <= TARGET_RATIO)}",
            ),
            ("plain loop peak memory", f"{plain['peak_mem_bytes'] / 1e9:.2f} GB", ""),
        ]
        numbers["plain"] = {"step_time": t_plain, "peak_mem_bytes": plain["peak_mem_bytes"]}
    else:
        rows.append(("plain PyTorch loop", MISSING, ""))
    for mode, steps in (("none", none), ("full", full)):
        plan = _load(work / f"plan-{mode}.json")
        label = f"peak memory, activation checkpointing {mode}"
        if not steps or not plan:
            rows.append((label, MISSING, ""))
            continue
        peak = max(s["peak_mem_bytes"] for s in steps)
        planned = plan_tensor_bytes(plan)
        error = peak / planned - 1
        value = f"{peak / 1e9:.2f} GB allocated, plan {planned / 1e9:.2f} GB: {100 * error:+.1f} %"
        rows.append((label, value, f"within 10 %: {verdict(abs(error) <= TARGET_MEMORY)}"))
        numbers.setdefault(mode, {}).update(peak_mem_bytes=peak, plan_tensor_bytes=planned)
    if full:
        t_full = steady(full, min(skip, 3))
        value = f"{t_full * 1e3:.1f} ms ({t_full / t_none:.2f}x none)"
        rows.append(("activation checkpointing full: step time", value, ""))
        numbers["full"]["step_time"] = t_full
    for mode, label in (("tp2", "TP2"), ("zero1", "ZeRO-1 DP2")):
        steps = _load(work / mode / "metrics.jsonl")
        if steps:
            t = steady(steps, min(skip, 3))
            loss = f"loss {steps[0]['loss']:.3f} → {steps[-1]['loss']:.3f}"
            rows.append((f"{label} on 2 GPUs", f"{t * 1e3:.1f} ms/step, {loss}", ""))
            numbers[mode] = {"step_time": t, "losses": [s["loss"] for s in steps]}
    if probe and probe["gpus"] < 2:
        rows.append(("TP2 / ZeRO on 2 GPUs", f"skipped: {probe['gpus']} GPU visible", "needs ≥ 2"))
    return rows, numbers


def plan_summary(path: Path) -> str:
    """One line of a `scaletrain plan --json` file: size, memory per GPU, predicted speed."""
    plan = json.loads(path.read_text())
    stage = max(plan["memory"]["stages"], key=lambda s: s["total_bytes"])
    layout = plan["layout"]
    return (
        f"plan activation_checkpointing={layout['activation_checkpointing']}: "
        f"{plan['parameters']['total'] / 1e9:.3f}B parameters, {stage['total_bytes'] / 1e9:.1f} GB "
        f"per GPU ({stage['activation_bytes'] / 1e9:.1f} GB activations), "
        f"{plan['time']['tokens_per_sec']:,.0f} tokens/s predicted on {plan['gpu']}"
    )


def markdown(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| measurement | value | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path)
    parser.add_argument("--plan-summary", type=Path, help="print one plan file's summary only")
    parser.add_argument("--config", default="benchmarks/gpu/llama-1b-h200.yaml")
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of medians")
    parser.add_argument("--md", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.plan_summary:
        print(plan_summary(args.plan_summary))
        return
    if args.work is None:
        parser.error("--work is required")
    rows, numbers = build(args.work, args.config, args.skip)
    text = markdown(rows)
    print(text, end="")
    if args.md:
        args.md.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=1))


if __name__ == "__main__":
    main()
