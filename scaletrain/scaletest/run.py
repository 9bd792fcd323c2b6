"""`scaletrain scaletest`: does every layout of N ranks train the same model as one rank?

    scaletrain scaletest --config configs/runs/tiny.yaml --world-size 4
    scaletrain scaletest --config configs/runs/tiny.yaml --world-size 8 --layouts tp2pp1dp4z1
    scaletrain scaletest --config configs/runs/tiny.yaml --world-size 2 --explain --steps 4

First one process trains the single-rank reference (the config at tp1pp1dp1 with its own ZeRO
stage), then one torchrun of N ranks trains every layout in turn (`worker.py`), each from the
same seed and data for K steps, each in its own run dir under <train.run_dir>/scaletest/.
Exit 0 when every layout's loss matches the reference at every step within the tolerance, 1
when one deviates or crashes, 2 for a bad argument or config.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from scaletrain.config.load import load_config, to_dict
from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError, ScaletrainError
from scaletrain.logs import get_logger
from scaletrain.plot import plot_scaletest
from scaletrain.scaletest import report
from scaletrain.scaletest.layouts import (
    Layout,
    enumerate_layouts,
    parse_layouts,
    validate,
)
from scaletrain.scaletest.worker import RESULT_FILE, STARTED_FILE, write_plan

log = get_logger(__name__)

REFERENCE_DIR = "reference"
DEFAULT_STEPS = 6
# Fields that may differ between the reference and the layouts without changing the losses.
_LAYOUT_FREE = ("parallel", "checkpoint", "fault", "logging", "train.run_dir", "train.eval_")


def scaletest_config(path: str, overrides: list[str], steps: int) -> Config:
    """The run config, made short and side-effect free: K steps, no checkpoints, no
    evaluation, no hang naming (the ranks do not restart between layouts), no wandb."""
    config = load_config(path, overrides)
    if steps < 1:
        raise ConfigError("--steps", f"must be >= 1, got {steps}")
    t, c = config.train, config.checkpoint
    t.steps, t.eval_interval, t.time_limit = steps, 0, None
    c.interval, c.interval_minutes, c.save_at_end, c.resume = 0, 0.0, False, "none"
    config.fault.heartbeat_seconds = 0.0
    config.logging.wandb, config.logging.jsonl, config.logging.interval = False, True, steps
    return config


def _env() -> dict[str, str]:
    # One intra-op thread per rank: the ranks share the cores, and the reference must not get
    # more threads than a rank (its step time is compared, and so are its last bits).
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def _run_worker(plan: Path, world_size: int) -> int:
    worker = ["-m", "scaletrain.scaletest.worker", str(plan)]
    if world_size == 1:
        command = [sys.executable, *worker]
    else:
        run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command = [*run, f"--nproc-per-node={world_size}", *worker]
    return subprocess.run(command, env=_env(), check=False).returncode


def _train(config: Config, world_size: int, runs: dict[str, Path], plan: Path) -> None:
    for run_dir in runs.values():
        shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl of an older scaletest
    write_plan(plan, config, world_size, runs)
    code = _run_worker(plan, world_size)
    if code == 0:
        return
    unfinished = [n for n, d in runs.items() if not (d / RESULT_FILE).exists()]
    crashed = [n for n in unfinished if (runs[n] / STARTED_FILE).exists()]
    where = f"during layout {crashed[0]}" if crashed else "before the first layout"
    raise report.ScaletestFailed(
        f"scaletest: the {world_size} rank(s) failed (exit {code}) {where}; "
        f"{len(runs) - len(unfinished)} of {len(runs)} layout(s) finished; see the output above"
    )


def _planned(
    config: Config, layouts: list[Layout], world_size: int
) -> dict[str, list[float] | None]:
    """What `scaletrain plan` predicts for every rank of every layout: tensor bytes, i.e.
    the stage's total less the per-process overhead (no model, no process group). A layout
    the planner cannot plan gets None ("n/a" in the table) instead of losing the losses."""
    from scaletrain.plan.accuracy import planned_rank_bytes
    from scaletrain.plan.hardware import load_hardware

    hw = load_hardware("cpu", world_size)  # its attention kernel and overhead; no time used
    out: dict[str, list[float] | None] = {}
    for layout in layouts:
        try:
            resolved = validate(config, layout, world_size)
            out[layout.name] = planned_rank_bytes(layout.apply(config), resolved, hw)
        except ScaletrainError as err:
            log.warning("scaletest: no plan for %s: %s", layout.name, err)
            out[layout.name] = None
    return out


def _config_differences(reference_dir: Path, config: Config) -> list[str]:
    """Fields (other than layout, checkpoint, logging, ...) in which the reference run's
    config.yaml differs from this one: they make the comparison meaningless."""
    saved = reference_dir / "config.yaml"
    if not saved.is_file():
        return []
    theirs, ours = yaml.safe_load(saved.read_text()), to_dict(config)
    out = []
    for section, fields in ours.items():
        for name, value in fields.items():
            key = f"{section}.{name}"
            if key.startswith(_LAYOUT_FREE):
                continue
            if theirs.get(section, {}).get(name) != value:
                out.append(key)
    return out


def scaletest(
    config_path: str,
    overrides: list[str],
    world_size: int,
    steps: int = DEFAULT_STEPS,
    layouts: str | None = None,
    tolerance: float | None = None,
    explain: bool = False,
    reference: str | None = None,
) -> int:
    """Run the layouts and the reference, print and write the table; the exit status."""
    if world_size < 1:
        raise ConfigError("--world-size", f"must be >= 1, got {world_size}")
    config = scaletest_config(config_path, overrides, steps)
    if tolerance is None:
        tolerance = report.DEFAULT_TOLERANCE[config.precision.dtype]
    elif not tolerance > 0:
        raise ConfigError("--tolerance", f"must be > 0, got {tolerance}")
    accepted, rejected = enumerate_layouts(config, world_size)
    if layouts is not None:
        chosen = parse_layouts(layouts, config.parallel.zero_stage)
        for layout in chosen:
            validate(config, layout, world_size)
    elif not accepted:
        raise ConfigError(
            "--world-size",
            f"no layout of {world_size} rank(s) passes the config checks (first: "
            f"{rejected[0].layout.name}: {rejected[0].reason}); change the config or world size",
        )
    else:
        chosen = accepted
    reference_layout = Layout(tp=1, pp=1, dp=1, ep=1, zero=config.parallel.zero_stage)
    validate(config, reference_layout, 1)
    out_dir = Path(config.train.run_dir) / "scaletest"
    out_dir.mkdir(parents=True, exist_ok=True)
    if reference is None:
        reference_dir = out_dir / REFERENCE_DIR
        plan = out_dir / "plan-reference.json"
        _train(config, 1, {reference_layout.name: reference_dir}, plan)
    else:
        reference_dir = Path(reference)
        differs = _config_differences(reference_dir, config)
        if differs:
            log.warning(
                "the reference %s was trained with other %s than this config: losses will differ",
                reference_dir,
                ", ".join(differs),
            )
    ref = report.read_run(reference_dir, "reference", steps)
    runs = {layout.name: out_dir / layout.name for layout in chosen}
    _train(config, world_size, runs, out_dir / "plan.json")
    planned = _planned(config, chosen, world_size)
    rows = [
        report.compare(report.read_run(runs[name], name, steps), ref, tolerance, planned[name])
        for name in runs
    ]
    table = report.Report(
        world_size=world_size,
        steps=steps,
        dtype=config.precision.dtype,
        tolerance=tolerance,
        config=config_path,
        reference={
            "run_dir": str(reference_dir),
            "losses": ref.losses,
            "step_time": ref.step_time,
            "peak_mem_bytes": ref.peak_mem_bytes,
        },
        rows=rows,
        rejected=[{"layout": r.layout.name, "reason": r.reason} for r in rejected],
    )
    report.write(table, out_dir)
    plot_scaletest(out_dir / report.REPORT_PNG, reference_dir, runs)
    report.show(table, out_dir, explain)
    return 0 if table.passed else 1
