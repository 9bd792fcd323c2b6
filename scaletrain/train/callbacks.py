"""Hooks into the training loop, so that the loop holds the steps and nothing else.

As OLMo-core's `Callback`: each concern (the heartbeat, the loss guard and its rollback,
evaluation, metrics logging, checkpointing and the stop request, the straggler report) is one
object with a few hook methods, attached to the Trainer in priority order. `train_step` fires
`on_step_start` and `on_micro_batch` (so that a benchmark calling it alone still marks
progress); `Trainer.run` fires `on_step_end` after each step, `on_train_end` when every step is
done and `on_close` always; `evaluate` and `save` fire `on_eval` and `on_save` as they begin.
`on_step_end` callbacks run highest priority first and may add keys to the step's metrics (the
order of metrics.jsonl's keys is the order they are added in), roll back, save or stop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from scaletrain.fault.signals import StopRequested

if TYPE_CHECKING:
    from scaletrain.train.straggler import StragglerReport
    from scaletrain.train.trainer import Trainer

# The built-ins' places: the heartbeat marks first; at a step's end measure, judge, evaluate,
# log, then save or stop.
HEARTBEAT, STRAGGLER, GUARD, EVAL, LOG, CHECKPOINT = 110, 100, 90, 80, -80, -90


class Callback:
    """Base class: every hook is a no-op; override the ones you need."""

    priority: ClassVar[int] = 0
    """Higher runs earlier. Between EVAL (80) and LOG (-80) a callback's metrics are logged."""

    trainer: Trainer

    def attach(self, trainer: Trainer) -> None:
        """Called once when the callback joins the trainer."""
        self.trainer = trainer

    def on_step_start(self, step: int) -> None:
        """Step `step` (1-based) begins: nothing of it has run yet."""

    def on_micro_batch(self, step: int, micro: int, phase: str) -> None:
        """Micro-batch `micro` of `step` enters `phase` (forward, backward, step, or pipeline
        for DeepSpeed's whole 1F1B schedule); called inside the phase's straggler timing."""

    def on_step_end(self, metrics: dict[str, Any]) -> None:
        """The optimizer step is done (`trainer.step` counts it); `metrics` may be extended."""

    def on_eval(self, step: int) -> None:
        """An evaluation of the model after `step` begins."""

    def on_save(self, step: int) -> None:
        """A checkpoint of `step` begins."""

    def on_train_end(self) -> None:
        """Every step ran (not called when the loop stops or fails)."""

    def on_close(self) -> None:
        """The loop is left, normally or by an exception."""


class Callbacks(Callback):
    """The trainer's callbacks in priority order (ties keep the order they were added in)."""

    def __init__(self, trainer: Trainer, callbacks: list[Callback] | None = None) -> None:
        self.trainer = trainer
        self.items: list[Callback] = []
        for callback in callbacks or []:
            self.add(callback)

    def add(self, callback: Callback) -> Callback:
        callback.attach(self.trainer)
        self.items.append(callback)
        self.items.sort(key=lambda c: -c.priority)  # stable: ties keep their order
        return callback

    def on_step_start(self, step: int) -> None:
        for c in self.items:
            c.on_step_start(step)

    def on_micro_batch(self, step: int, micro: int, phase: str) -> None:
        for c in self.items:
            c.on_micro_batch(step, micro, phase)

    def on_step_end(self, metrics: dict[str, Any]) -> None:
        for c in self.items:
            c.on_step_end(metrics)

    def on_eval(self, step: int) -> None:
        for c in self.items:
            c.on_eval(step)

    def on_save(self, step: int) -> None:
        for c in self.items:
            c.on_save(step)

    def on_train_end(self) -> None:
        for c in self.items:
            c.on_train_end()

    def on_close(self) -> None:
        for c in self.items:
            c.on_close()


class StragglerCallback(Callback):
    """Every `logging.straggler_interval` steps: gather the ranks' phase times (a collective
    on every rank) and add the worst straggler's keys; the test delay goes into backward."""

    priority = STRAGGLER

    def __init__(self, report: StragglerReport) -> None:
        self.report = report

    def on_micro_batch(self, step: int, micro: int, phase: str) -> None:
        if phase == "backward":
            self.report.delay(step)

    def on_step_end(self, metrics: dict[str, Any]) -> None:
        t = self.trainer
        metrics.update(self.report.gather(t.step_timer, t.step))


class EvalCallback(Callback):
    """Every `train.eval_interval` steps and after the last one, unless the step was rolled
    back: the validation loss (and a classifier's val_accuracy / val_f1)."""

    priority = EVAL

    def on_step_end(self, metrics: dict[str, Any]) -> None:
        t = self.trainer
        interval = t.config.train.eval_interval
        last = t.step == t.config.train.steps
        if "rolled_back_to" in metrics or interval <= 0:
            return
        if t.step % interval == 0 or last:
            metrics["val_loss"] = t.evaluate()
            metrics.update(t.eval_metrics)


class MetricsCallback(Callback):
    """Every step's metrics to the sinks (console, metrics.jsonl, TensorBoard, wandb)."""

    priority = LOG

    def on_step_end(self, metrics: dict[str, Any]) -> None:
        self.trainer.metrics.log_step(metrics)


class CheckpointCallback(Callback):
    """Saves at `checkpoint.interval`, at the end (`save_at_end`) and on a stop request; a
    stop (a signal or the time limit, agreed by every rank) waits for the write to be
    published, then leaves with StopRequested (exit 75)."""

    priority = CHECKPOINT

    def on_step_end(self, metrics: dict[str, Any]) -> None:
        t = self.trainer
        t.stopwatch.record_step(metrics["step_time"])
        reason = t.stopwatch.agreed_reason(t.topology.device)
        finished = t.step == t.config.train.steps
        save_at_end = finished and t.config.checkpoint.save_at_end
        if not (reason or save_at_end or t.checkpoints.due(t.step)):
            return
        path = t.save()
        if reason:
            t.checkpoints.finish_writes()  # exit 75 only with the checkpoint published
            t.metrics.close()
            raise StopRequested(
                f"stopped after step {t.step} ({reason}); checkpoint {path} saved; "
                "run the same command to resume"
            )

    def on_train_end(self) -> None:
        self.trainer.checkpoints.finish_writes()  # an async save of the last step is on disk

    def on_close(self) -> None:
        self.trainer.stopwatch.restore()
