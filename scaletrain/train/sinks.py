"""Where rank 0's per-step metrics go: one small interface, one class per destination.

As torchtitan's `BaseLogger`: the trainer hands every sink the same dict (the keys of
metrics.jsonl) and never knows which sinks exist. The console sink lives in `console.py`.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from scaletrain.config.schema import Config

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsSink(ABC):
    """One destination of step metrics."""

    @abstractmethod
    def log(self, metrics: dict[str, Any]) -> None:
        """Record one step's metrics (`metrics["step"]` is the step)."""

    def close(self) -> None:  # noqa: B027 (a sink with nothing to flush keeps this no-op)
        """Flush and release; called once, also when the run stops early."""


class JsonlSink(MetricsSink):
    """<run_dir>/metrics.jsonl, one JSON object per step, line-buffered so that a killed run
    loses at most its last line."""

    def __init__(self, run_dir: Path, resumed_step: int) -> None:
        path = run_dir / METRICS_FILE
        _drop_steps_after(path, resumed_step)
        self.file = path.open("a", buffering=1)

    def log(self, metrics: dict[str, Any]) -> None:
        self.file.write(json.dumps(metrics) + "\n")

    def close(self) -> None:
        self.file.close()


class TensorBoardSink(MetricsSink):
    """Event files under <run_dir>/tensorboard through `torch.utils.tensorboard`: every
    numeric key of metrics.jsonl as a scalar of the same name, stored as float64 so that the
    event file holds the logged values exactly. Text values (a straggler's host) are skipped."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))

    def log(self, metrics: dict[str, Any]) -> None:
        step = int(metrics["step"])
        for key, value in metrics.items():
            if key != "step" and isinstance(value, int | float):  # bool is an int
                self.writer.add_scalar(
                    key, float(value), step, new_style=True, double_precision=True
                )

    def close(self) -> None:
        self.writer.close()


class WandbSink(MetricsSink):
    """Weights & Biases, offline unless WANDB_API_KEY is set."""

    def __init__(self, config: Config, run_dir: Path) -> None:
        import wandb

        from scaletrain.config.load import to_dict

        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        self.run = wandb.init(
            project=config.logging.wandb_project,
            dir=str(run_dir),
            config=to_dict(config),
            mode=mode,
            name=run_dir.name,
        )

    def log(self, metrics: dict[str, Any]) -> None:
        self.run.log(metrics, step=metrics["step"])

    def close(self) -> None:
        self.run.finish()


def _drop_steps_after(path: Path, step: int) -> None:
    """A resumed run continues the curve: steps after the checkpoint are logged again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if _step(line) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line from a killed run: drop it
