"""The metrics sinks: TensorBoard holds exactly what metrics.jsonl holds; other ranks write none."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util.tensor_util import make_ndarray

from scaletrain.config.schema import Config
from scaletrain.train.metrics import MetricsWriter

LOSSES = [10.987654321012345, 7.3890560989306495, 1 / 3]


def _step(step: int, loss: float) -> dict:
    return {
        "step": step,
        "loss": loss,
        "lr": 3e-3 * step,
        "grad_norm": 0.5 + step,
        "tokens_per_sec": 1234.5,
        "mfu": 0.0123,
        "peak_mem_bytes": 2**31 + step,
        "step_time": 0.25,
        "skipped_steps": 0,
        "skipped": step == 2,
        **({"straggler_rank": 3, "straggler_host": "node7"} if step == 3 else {}),
    }


def _events(folder: Path) -> dict[str, dict[int, float]]:
    (path,) = folder.glob("events.out.tfevents.*")
    scalars: dict[str, dict[int, float]] = {}
    for event in EventFileLoader(str(path)).Load():
        for value in event.summary.value:
            scalars.setdefault(value.tag, {})[event.step] = make_ndarray(value.tensor).item()
    return scalars


def test_tensorboard_holds_the_jsonl_values_exactly(tmp_path: Path) -> None:
    config = Config()
    config.logging.tensorboard = True
    out = io.StringIO()
    writer = MetricsWriter(config, tmp_path, 3, enabled=True, console=Console(file=out))
    for step, loss in enumerate(LOSSES, start=1):
        writer.log_step(_step(step, loss))
    writer.close()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in logged] == LOSSES
    scalars = _events(tmp_path / "tensorboard")
    assert scalars["loss"] == {1: LOSSES[0], 2: LOSSES[1], 3: LOSSES[2]}  # float64, bit-equal
    numeric = {
        (k, m["step"]): float(v)
        for m in logged
        for k, v in m.items()
        if k != "step" and not isinstance(v, str)
    }
    assert {(k, s): v for k, by_step in scalars.items() for s, v in by_step.items()} == numeric
    assert "straggler_host" not in scalars  # text has no scalar
    assert out.getvalue().count("step ") == 3  # the console sink got every step too


def test_other_ranks_write_nothing_and_a_resume_drops_later_steps(tmp_path: Path) -> None:
    config = Config()
    config.logging.tensorboard = True
    quiet = io.StringIO()
    other = MetricsWriter(config, tmp_path, 3, enabled=False, console=Console(file=quiet))
    other.log_step(_step(1, 1.0))
    other.summary("done")
    other.close()
    assert list(tmp_path.iterdir()) == [] and quiet.getvalue() == ""
    first = MetricsWriter(config, tmp_path, 3, enabled=True, console=Console(file=quiet))
    for step, loss in enumerate(LOSSES, start=1):
        first.log_step(_step(step, loss))
    first.close()
    resumed = MetricsWriter(
        config, tmp_path, 3, enabled=True, resumed_step=1, console=Console(file=quiet)
    )
    resumed.log_step(_step(2, 5.0))
    resumed.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [(json.loads(x)["step"], json.loads(x)["loss"]) for x in lines] == [
        (1, LOSSES[0]),
        (2, 5.0),
    ]
