"""The loop's hooks (scaletrain.train.callbacks): a custom callback sees every hook in the
loop's order, in a world of one inside this process (two short runs: a stop, then a resume)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from scaletrain.config import check_config, load_config
from scaletrain.fault.signals import StopRequested
from scaletrain.train.callbacks import EVAL, GUARD, LOG, Callback, Callbacks

TINY = Path(__file__).parents[2] / "configs" / "runs" / "tiny.yaml"
PHASES = ("forward", "backward", "step")


class Recorder(Callback):
    """Writes down (hook, step) and the metrics it is handed; at `stop_at` it sends itself
    SIGUSR1, as SLURM's warning signal would."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.seen: list[tuple] = []
        self.metrics: list[dict[str, Any]] = []
        self.stop_at = stop_at

    def on_step_start(self, step: int) -> None:
        self.seen.append(("step_start", step))
        if step == self.stop_at:
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_micro_batch(self, step: int, micro: int, phase: str) -> None:
        self.seen.append(("micro_batch", step, micro, phase))

    def on_step_end(self, metrics: dict[str, Any]) -> None:
        self.seen.append(("step_end", self.trainer.step))
        self.metrics.append(dict(metrics))
        metrics["recorded"] = True  # between EVAL and LOG: it reaches metrics.jsonl

    def on_eval(self, step: int) -> None:
        self.seen.append(("eval", step))

    def on_save(self, step: int) -> None:
        self.seen.append(("save", step))

    def on_train_end(self) -> None:
        self.seen.append(("train_end",))

    def on_close(self) -> None:
        self.seen.append(("close",))


def _step(step: int, micro_batches: int) -> list[tuple]:
    marks = [("micro_batch", step, i, p) for i in range(micro_batches) for p in PHASES]
    return [("step_start", step), *marks]


def test_a_callback_sees_the_loop_in_order(stdlib_data: Path, tmp_path: Path) -> None:
    from scaletrain.topology.init import init_topology
    from scaletrain.train.trainer import Trainer

    overrides = [
        f"data.paths=[{stdlib_data}]",
        f"train.run_dir={tmp_path / 'run'}",
        "train.steps=4",
        "train.eval_interval=2",
        "checkpoint.interval=2",
    ]
    config = load_config(TINY, overrides)
    resolved = check_config(config, world_size=1)
    micro = resolved.global_batch // resolved.micro_batch  # 4 micro-batches on one rank
    saved = dict(os.environ)
    topology = init_topology(resolved.dims)
    try:
        # Run 1: SIGUSR1 during step 3 -> checkpoint of step 3, StopRequested (exit 75).
        first = Recorder(stop_at=3)
        trainer = Trainer(config, topology, resolved, callbacks=[first])
        with pytest.raises(StopRequested) as stop:
            trainer.run()
        trainer.close()
        trainer.engine.destroy()
        # Run 2: resumes from step 3 and finishes: eval and save of the last step, then the end.
        second = Recorder()
        trainer = Trainer(load_config(TINY, overrides), topology, resolved, callbacks=[second])
        summary = trainer.run()
        trainer.engine.destroy()
    finally:
        topology.destroy()
        os.environ.clear()
        os.environ.update(saved)

    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000003"
    assert str(stop.value) == (
        f"stopped after step 3 (signal SIGUSR1); checkpoint {checkpoint} saved; "
        "run the same command to resume"
    )
    # Eval (priority 80) runs inside on_step_end before this callback (0); save (-90) after.
    assert first.seen == [
        *_step(1, micro),
        ("step_end", 1),
        *_step(2, micro),
        ("eval", 2),
        ("step_end", 2),
        ("save", 2),
        *_step(3, micro),
        ("step_end", 3),
        ("save", 3),
        ("close",),
    ]
    assert second.seen == [
        *_step(4, micro),
        ("eval", 4),
        ("step_end", 4),
        ("save", 4),
        ("train_end",),
        ("close",),
    ]
    # The callback got what metrics.jsonl holds, key for key; its own key was logged too.
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    assert logged == [{**m, "recorded": True} for m in first.metrics + second.metrics]
    assert ["val_loss" in m for m in logged] == [False, True, False, True]
    assert summary.final_val_loss == logged[-1]["val_loss"]
    assert summary.final_loss == logged[-1]["loss"]


def test_callbacks_run_by_priority_then_in_the_order_added() -> None:
    order: list[str] = []

    def named(name: str, rank: int) -> Callback:
        class Named(Callback):
            priority = rank

            def on_step_end(self, metrics: dict[str, Any]) -> None:
                order.append(name)

        return Named()

    callbacks = Callbacks(trainer=None, callbacks=[named("log", LOG), named("a", 0)])  # type: ignore[arg-type]
    callbacks.add(named("guard", GUARD))
    callbacks.add(named("b", 0))
    callbacks.add(named("eval", EVAL))
    callbacks.on_step_end({})
    assert order == ["guard", "eval", "a", "b", "log"]
