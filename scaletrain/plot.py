"""`scaletrain plot`: the curves of one or more runs as one PNG, one panel per metric.

    scaletrain plot runs/tiny
    scaletrain plot runs/tp2 runs/pp2 -o compare.png --metrics loss,val_loss --log-y

Reads each run's metrics.jsonl; a resumed run logs the steps after its checkpoint again, and
the last record of each step is the one plotted. Several runs are overlaid, labelled with their
folder names (e.g. two layouts, or a resumed run against an uninterrupted one). matplotlib's
Agg backend: no display needed. `scaletrain scaletest` draws its scaletest.png with it too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scaletrain.errors import ScaletrainError

DEFAULT_METRICS = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "peak_mem_bytes")
DEFAULT_FILE = "metrics.png"
REFERENCE_LABEL = "reference (1 rank)"
# Figure size: every panel is PANEL_WIDTH x PANEL_HEIGHT inches at DPI (no tight cropping, so
# the PNG is exactly width x (panels x height) pixels).
PANEL_WIDTH, PANEL_HEIGHT, DPI = 8.0, 2.5, 100

Curve = tuple[list[int], list[float]]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    plot = subparsers.add_parser("plot", help="draw the metrics of one or more runs as a PNG")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders to overlay")
    plot.add_argument(
        "-o", dest="out", metavar="FILE.png", help=f"default: <first RUN_DIR>/{DEFAULT_FILE}"
    )
    plot.add_argument(
        "--metrics",
        default=",".join(DEFAULT_METRICS),
        help="comma-separated metrics.jsonl keys, one panel each (default: %(default)s)",
    )
    plot.add_argument("--log-y", action="store_true", help="logarithmic y axes")


def run(args: argparse.Namespace) -> int:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if not metrics:
        raise ScaletrainError("plot: --metrics names no metric")
    dirs = [Path(d) for d in args.run_dirs]
    out = Path(args.out) if args.out else dirs[0] / DEFAULT_FILE
    if out.suffix.lower() != ".png":
        raise ScaletrainError(f"plot: -o {out} must end in .png")
    runs = {_label(d, dirs): read_curves(d, metrics) for d in dirs}
    absent = [m for m in metrics if not any(curves[m][0] for curves in runs.values())]
    if len(absent) == len(metrics):
        raise ScaletrainError(f"plot: no run logged any of {', '.join(metrics)}")
    figure = draw(runs, metrics, log_y=args.log_y)
    save(figure, out)
    print(f"wrote {out}: {len(metrics)} panel(s), {len(runs)} run(s)")
    return 0


def read_curves(run_dir: Path, metrics: list[str]) -> dict[str, Curve]:
    """{metric: (steps, values)} from metrics.jsonl, the last record of each step winning."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ScaletrainError(f"plot: {path} does not exist; is {run_dir} a training run?")
    last: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            last[int(record["step"])] = record
        except (ValueError, KeyError, TypeError):
            continue  # the torn last line of a killed run
    curves: dict[str, Curve] = {}
    for metric in metrics:
        points = [
            (step, float(r[metric]))
            for step, r in sorted(last.items())
            if isinstance(r.get(metric), int | float)
        ]
        curves[metric] = ([s for s, _ in points], [v for _, v in points])
    return curves


def draw(runs: dict[str, dict[str, Curve]], metrics: list[str], log_y: bool = False):
    """The figure: one panel per metric (rows), one line per run in each."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(PANEL_WIDTH, PANEL_HEIGHT * len(metrics)), dpi=DPI)
    axes = figure.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    for ax, metric in zip(axes, metrics, strict=True):
        for name, curves in runs.items():
            steps, values = curves[metric]
            if steps:
                ax.plot(steps, values, label=name, marker="." if len(steps) < 50 else None)
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        elif log_y and all(v > 0 for line in ax.lines for v in line.get_ydata()):
            ax.set_yscale("log")
        ax.set_ylabel(metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
        ax.grid(True, alpha=0.3)
        if len(runs) > 1 and ax.lines:
            ax.legend(fontsize="small")
    axes[-1].set_xlabel("step")
    figure.set_layout_engine("constrained")
    return figure


def plot_scaletest(out: Path, reference: Path, layouts: dict[str, Path]) -> None:
    """scaletest.png: every layout's loss curve, the single-rank reference dashed over them."""
    runs = {name: read_curves(run_dir, ["loss"]) for name, run_dir in layouts.items()}
    runs[REFERENCE_LABEL] = read_curves(reference, ["loss"])
    figure = draw(runs, ["loss"])
    reference_line = figure.axes[0].lines[-1]
    reference_line.set(color="black", linestyle="--", linewidth=1.2, zorder=10)
    figure.axes[0].legend(fontsize="small")  # again: the reference's new style
    save(figure, out)


def save(figure, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=DPI)


def _label(run_dir: Path, dirs: list[Path]) -> str:
    """The folder name, or the path where two runs share a name."""
    same = [d for d in dirs if d.name == run_dir.name]
    return run_dir.name if len(same) == 1 else str(run_dir)
