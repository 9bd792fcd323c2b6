"""Compare every layout's losses with the single-rank reference; print and save the table.

A layout passes when at every one of the K steps its loss is within `tolerance` (relative) of
the reference's loss at that step. Step time is the median over steps 2..K (step 1 pays for
lazy allocations and DeepSpeed's first-step setup); peak memory is the largest of all ranks,
measured as live tensor bytes (see `worker.py`) and set beside what `scaletrain plan` predicts
for the same layout: a layout whose worst rank the plan misses by more than `PLAN_WARN` is
marked in the table, a warning only (the losses decide pass or fail).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scaletrain.errors import ScaletrainError

REPORT_JSON, REPORT_MD = "scaletest.json", "scaletest.md"
REPORT_PNG = "scaletest.png"  # the loss curves, drawn by scaletrain.plot

# Largest relative loss difference a layout may show against one rank, by precision.dtype.
# Measured on the tiny config, 6 steps, 4 ranks (docs/scaletest.md): fp32 layouts differ by 0 to
# ~1e-7 (summation order). In bf16/fp16 a different reduction order costs up to 2.0e-4 (bf16,
# tp2 x dp2, ZeRO 0) and ZeRO 1-3 layouts differ by <= 4.2e-5; 1e-3 leaves 5x room. What 1e-3
# still catches: DeepSpeed's ZeRO-0 path accumulates and all-reduces low-precision gradients
# where its ZeRO 1-3 keep them in fp32, and the two differ by 5.8e-3 (bf16) and 2.2e-2 (fp16).
DEFAULT_TOLERANCE = {"fp32": 1e-5, "bf16": 1e-3, "fp16": 1e-3}
PLAN_WARN = 0.15  # |planned / measured - 1| above this marks the layout's memory (issue 11)
PLAN_MARK = "!"


class ScaletestFailed(ScaletrainError):
    """The ranks of a layout crashed: no loss to compare (exit 1, as for a deviation)."""

    exit_code = 1


@dataclass
class RunResult:
    """What one run (a layout or the reference) left in its run dir."""

    name: str
    losses: list[float]
    step_time: float
    peak_mem_bytes: list[int] = field(default_factory=list)
    """One entry per rank."""


@dataclass
class Row:
    """One line of the table."""

    layout: str
    final_loss: float
    max_abs_diff: float
    max_rel_diff: float
    step_time: float
    peak_mem_bytes: int
    """The largest peak of all ranks."""
    peak_mem_bytes_per_rank: list[int]
    ok: bool
    losses: list[float]
    planned_mem_bytes: float | None = None
    """The plan's largest per-rank tensor bytes (its stage total less the process overhead)."""
    plan_error: float | None = None
    """planned / measured - 1 of the rank the plan misses most."""

    @property
    def plan_deviates(self) -> bool:
        return self.plan_error is not None and abs(self.plan_error) > PLAN_WARN


def read_run(run_dir: Path, name: str, steps: int) -> RunResult:
    """Losses and step times from metrics.jsonl, memory from the worker's result.json."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ScaletrainError(f"scaletest: {path} does not exist; is {run_dir} a training run?")
    metrics = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_step = {int(m["step"]): m for m in metrics}
    missing = [s for s in range(1, steps + 1) if s not in by_step]
    if missing:
        raise ScaletrainError(
            f"scaletest: {path} has no step {missing[0]} (needs steps 1..{steps}); "
            "train it longer or pass a smaller --steps"
        )
    rows = [by_step[s] for s in range(1, steps + 1)]
    times = [m["step_time"] for m in rows[1:]] or [rows[0]["step_time"]]
    result_file = run_dir / "result.json"
    peaks = [rows[-1]["peak_mem_bytes"]]  # a plain run: rank 0's own number
    if result_file.is_file():
        peaks = json.loads(result_file.read_text())["peak_mem_bytes"]
    return RunResult(name, [m["loss"] for m in rows], statistics.median(times), peaks)


def compare(
    run: RunResult, reference: RunResult, tolerance: float, planned: list[float] | None = None
) -> Row:
    """The row of one layout: its worst step against the reference's same step, and (given
    the plan's bytes per rank) its worst rank against the plan."""
    pairs = list(zip(run.losses, reference.losses, strict=True))
    absolute = [abs(got - want) for got, want in pairs]
    relative = [abs(got - want) / abs(want) if want else math.inf for got, want in pairs]
    worst_abs = max(absolute)
    worst_rel = max(relative)
    finite = all(math.isfinite(x) for x in run.losses)
    plan_error = None
    if planned is not None and len(planned) == len(run.peak_mem_bytes):
        pairs = zip(planned, run.peak_mem_bytes, strict=True)
        plan_error = max((p / m - 1 if m else math.inf for p, m in pairs), key=abs)
    return Row(
        layout=run.name,
        final_loss=run.losses[-1],
        max_abs_diff=worst_abs,
        max_rel_diff=worst_rel,
        step_time=run.step_time,
        peak_mem_bytes=max(run.peak_mem_bytes),
        peak_mem_bytes_per_rank=run.peak_mem_bytes,
        ok=finite and worst_rel <= tolerance,
        losses=run.losses,
        planned_mem_bytes=max(planned) if planned else None,
        plan_error=plan_error,
    )


@dataclass
class Report:
    """Everything `scaletest.json` holds."""

    world_size: int
    steps: int
    dtype: str
    tolerance: float
    config: str
    reference: dict[str, Any]
    rows: list[Row]
    rejected: list[dict[str, str]]

    @property
    def passed(self) -> bool:
        return all(row.ok for row in self.rows)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["passed"] = self.passed
        for row, saved in zip(self.rows, out["rows"], strict=True):
            saved["plan_deviates"] = row.plan_deviates
        return out


def _mib(value: int) -> str:
    return f"{value / 2**20:,.0f}"


def _planned_cell(row: Row) -> str:
    """Planned MiB and the worst rank's error; the mark when it is above PLAN_WARN."""
    if row.planned_mem_bytes is None or row.plan_error is None:
        return "n/a"
    mark = f" {PLAN_MARK}" if row.plan_deviates else ""
    return f"{row.planned_mem_bytes / 2**20:,.1f} ({row.plan_error:+.0%}){mark}"


def _cells(row: Row) -> list[str]:
    return [
        row.layout,
        f"{row.final_loss:.6f}",
        f"{row.max_abs_diff:.2e}",
        f"{row.max_rel_diff:.2e}",
        f"{row.step_time:.3f}",
        f"{row.peak_mem_bytes / 2**20:,.1f}",
        _planned_cell(row),
        "ok" if row.ok else "DEVIATES",
    ]


HEADERS = [
    "layout",
    "final loss",
    "max |Δloss|",
    "max rel Δ",
    "step time (s)",
    "measured mem/rank (MiB)",
    "planned (MiB)",
    "check",
]


def plan_warning(report: Report) -> str | None:
    """The line under the table that explains the mark, naming the marked layouts."""
    marked = [row.layout for row in report.rows if row.plan_deviates]
    if not marked:
        return None
    return (
        f"{PLAN_MARK} planned memory off by more than {PLAN_WARN:.0%} of the measured live "
        f"tensor bytes (a warning, not a failure): {', '.join(marked)}"
    )


def _caption(report: Report) -> str:
    ref = report.reference
    return (
        f"{report.world_size} rank(s), {report.steps} steps, {report.dtype}; reference "
        f"(1 rank): final loss {ref['losses'][-1]:.6f}, step time {ref['step_time']:.3f} s, "
        f"peak mem {_mib(max(ref['peak_mem_bytes']))} MiB; tolerance {report.tolerance:.0e} "
        "relative"
    )


def markdown(report: Report) -> str:
    lines = [
        f"# scaletest: {report.config}",
        "",
        _caption(report),
        "",
        "| " + " | ".join(h.replace("|", "\\|") for h in HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in report.rows]
    warning = plan_warning(report)
    if warning:
        lines += ["", warning]
    if report.rejected:
        lines += ["", f"{len(report.rejected)} candidate layout(s) rejected by the config checks:"]
        lines += [f"- {r['layout']}: {r['reason']}" for r in report.rejected]
    return "\n".join(lines) + "\n"


def write(report: Report, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_JSON).write_text(json.dumps(report.to_json(), indent=1) + "\n")
    (out_dir / REPORT_MD).write_text(markdown(report))


def show(report: Report, out_dir: Path, explain: bool) -> None:
    """The rich table on stdout, then the rejected layouts (listed with `explain`)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"scaletest {report.config}", caption=_caption(report))
    for header in HEADERS:
        table.add_column(header, justify="left" if header == "layout" else "right", no_wrap=True)
    for row in report.rows:
        cells = _cells(row)
        cells[-1] = "[green]ok[/green]" if row.ok else "[bold red]DEVIATES[/bold red]"
        table.add_row(*cells)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    console.print(table)
    warning = plan_warning(report)
    if warning:
        console.print(warning, style="yellow", markup=False)
    if report.rejected and explain:
        console.print(f"{len(report.rejected)} candidate layout(s) rejected by the config checks:")
        for r in report.rejected:
            console.print(f"  {r['layout']}: {r['reason']}", markup=False)
    elif report.rejected:
        console.print(
            f"{len(report.rejected)} candidate layout(s) rejected by the config checks "
            "(--explain lists them)"
        )
    failed = [row.layout for row in report.rows if not row.ok]
    verdict = f"FAILED: {', '.join(failed)} deviate" if failed else "passed"
    console.print(
        f"{verdict}; wrote {out_dir / REPORT_JSON}, {REPORT_MD} and {REPORT_PNG}", markup=False
    )
