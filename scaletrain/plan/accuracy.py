"""Planned versus measured peak memory per rank, for `benchmarks/plan_accuracy.py` and its test.

A case is a layout (and recompute mode) of one config; `scaletrain.plan.measure` trains it on
CPU ranks and reports each rank's peak of live tensor bytes; here each rank is compared with
the planner's total for its own pipeline stage, less the per-process overhead (which is not
tensor bytes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from scaletrain.config.checks import Resolved, check_config
from scaletrain.config.load import load_config
from scaletrain.config.schema import Config
from scaletrain.plan.hardware import Hardware, load_hardware
from scaletrain.plan.planner import make_plan


@dataclass(frozen=True)
class Row:
    name: str
    planned: float
    """Bytes of the rank with the largest error (its stage's total, overhead left out)."""
    measured: float
    error: float
    """planned / measured - 1 of that rank."""


def write_cases(
    path: Path, config: str, overrides: list[str], cases: dict[str, list[str]], steps: int = 3
) -> None:
    """The file `scaletrain.plan.measure` reads: name -> overrides of each case."""
    spec = {
        "config": config,
        "steps": steps,
        "overrides": overrides,
        "cases": [{"name": name, "overrides": extra} for name, extra in cases.items()],
    }
    path.write_text(json.dumps(spec, indent=1))


def planned_rank_bytes(config: Config, resolved: Resolved, hw: Hardware) -> list[float]:
    """Planned tensor bytes of every rank: its stage's total less the per-process overhead
    (interpreter and libraries, which no tensor measurement sees)."""
    plan = make_plan(config, resolved, hw)
    dims = resolved.dims
    stages = [plan.stages[dims.coords(rank)["pp"]] for rank in range(dims.world_size)]
    return [stage.total_bytes - stage.overhead_bytes for stage in stages]


def compare(cases_file: Path, result_file: Path, world_size: int) -> list[Row]:
    """One row per case: the rank whose measured peak the plan misses most."""
    spec = json.loads(cases_file.read_text())
    hw = load_hardware("cpu", world_size)
    rows = []
    for case in json.loads(result_file.read_text()):
        config = load_config(spec["config"], spec["overrides"] + case["overrides"])
        resolved = check_config(config, world_size)
        planned = planned_rank_bytes(config, resolved, hw)
        measured = [rank["peak_bytes"] for rank in case["ranks"]]
        rows.append(worst_rank(case["name"], planned, measured))
    return rows


def worst_rank(name: str, planned: list[float], measured: list[float]) -> Row:
    """The rank whose measured bytes the plan misses most (planned / measured - 1)."""
    rows = [Row(name, p, m, p / m - 1) for p, m in zip(planned, measured, strict=True)]
    return max(rows, key=lambda r: abs(r.error))


def format_rows(rows: list[Row]) -> list[str]:
    lines = [f"{'layout':<22} {'planned MB':>11} {'measured MB':>12} {'error':>8}"]
    for r in rows:
        lines.append(
            f"{r.name:<22} {r.planned / 1e6:11.1f} {r.measured / 1e6:12.1f} {r.error:+8.1%}"
        )
    worst = max(abs(r.error) for r in rows)
    lines.append(f"worst error {100 * worst:.1f} %")
    return lines


def measure_and_compare(
    out: Path,
    config: str,
    overrides: list[str],
    cases: dict[str, list[str]],
    world_size: int,
    steps: int = 3,
) -> list[Row]:
    """Train every case in one torchrun of `world_size` CPU ranks, then compare with the plan."""
    cases_file, result_file = out / "cases.json", out / "result.json"
    per_case = {name: [*extra, f"train.run_dir={out / name}"] for name, extra in cases.items()}
    write_cases(cases_file, config, overrides, per_case, steps)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    env["PYTHONPATH"] = f"{repo}{os.pathsep}{env.get('PYTHONPATH', '')}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={world_size}", "-m", "scaletrain.plan.measure"]
    done = subprocess.run(
        [*command, str(cases_file), str(result_file)],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
        raise RuntimeError(f"scaletrain.plan.measure failed ({done.returncode}):\n{tail}")
    return compare(cases_file, result_file, world_size)
