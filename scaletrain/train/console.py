"""The console sink: a live progress bar on a terminal, plain lines in a log file.

A log file (SLURM output, a pipe, CI) gets one unwrapped line every `logging.interval` steps,
which `launch status` and the tests parse; a terminal gets a rich progress bar instead (step /
total, loss, tokens/s, MFU, ETA and the last validation loss), redrawn in place.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from scaletrain.train.sinks import MetricsSink


def default_console() -> Console:
    return Console(file=sys.stdout, highlight=False, soft_wrap=True)


class ConsoleSink(MetricsSink):
    """Progress on stdout; `console.is_terminal` picks the bar or the plain lines."""

    def __init__(self, total_steps: int, interval: int, console: Console | None = None) -> None:
        self.console = console or default_console()
        self.total_steps, self.interval = total_steps, interval
        self.start = time.perf_counter()
        self.first_step: int | None = None
        self.progress: Progress | None = None
        self.task = None
        self.val_text = ""

    def log(self, metrics: dict[str, Any]) -> None:
        step = metrics["step"]
        if self.first_step is None:
            self.first_step, self.start = step, time.perf_counter()
        if self.console.is_terminal:
            self._advance(metrics)
        elif step % self.interval == 0 or step == self.total_steps or "val_loss" in metrics:
            self.console.print(self.line(metrics))

    def line(self, m: dict[str, Any]) -> str:
        """The plain progress line of a log file."""
        done = m["step"] - (self.first_step or 0)
        per_step = (time.perf_counter() - self.start) / done if done else 0.0
        eta = per_step * (self.total_steps - m["step"])
        line = (
            f"step {m['step']:>5}/{self.total_steps}  loss {m['loss']:.4f}  lr {m['lr']:.2e}  "
            f"gnorm {m['grad_norm']:.3f}  {m['tokens_per_sec']:,.0f} tok/s  "
            f"MFU {100 * m['mfu']:.2f}%  mem {m['peak_mem_bytes'] / 2**30:.2f} GiB  "
            f"ETA {duration(eta)}"
        )
        if "val_loss" in m:
            line += f"  [bold]val_loss {m['val_loss']:.4f}[/bold]"
        if "val_accuracy" in m:  # train.task: classify
            line += f"  [bold]val_acc {m['val_accuracy']:.3f}  val_f1 {m['val_f1']:.3f}[/bold]"
        return line

    def _advance(self, m: dict[str, Any]) -> None:
        if self.progress is None:
            self.progress = Progress(
                TextColumn("step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[stats]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task(
                "train", total=self.total_steps, completed=m["step"] - 1, stats=""
            )
        if "val_loss" in m:
            self.val_text = f"  val_loss {m['val_loss']:.4f}"
        stats = (
            f"loss {m['loss']:.4f}  {m['tokens_per_sec']:,.0f} tok/s  "
            f"MFU {100 * m['mfu']:.2f}%{self.val_text}"
        )
        assert self.task is not None
        self.progress.update(self.task, completed=m["step"], stats=stats)

    def print(self, text: str) -> None:
        """A line above the bar (or in the log)."""
        self.console.print(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else (f"{seconds // 60}m{seconds % 60:02d}s")
    )
