"""The console sink: plain lines in a log file (parsed by tests and `launch status`), a live
rich progress bar on a terminal."""

from __future__ import annotations

import io
import re

from rich.console import Console

from scaletrain.train.console import ConsoleSink

STEPS = 4


def _metrics(step: int) -> dict:
    m = {
        "step": step,
        "loss": 4.0 - step / 8,
        "lr": 1e-3,
        "grad_norm": 0.75,
        "tokens_per_sec": 12345.6,
        "mfu": 0.0312,
        "peak_mem_bytes": 3 * 2**30,
    }
    return {**m, "val_loss": 3.25} if step == 2 else m


def _feed(console: Console, interval: int) -> str:
    sink = ConsoleSink(STEPS, interval, console)
    for step in range(1, STEPS + 1):
        sink.log(_metrics(step))
    sink.print("done: 4 steps")
    sink.close()
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue()


def test_a_log_file_gets_todays_plain_lines() -> None:
    out = _feed(Console(file=io.StringIO(), force_terminal=False, width=300), interval=3)
    lines = out.splitlines()
    # interval 3: step 3, the last step, and the evaluated step 2
    assert [line.split("/")[0] for line in lines[:-1]] == ["step     2", "step     3", "step     4"]
    assert re.fullmatch(
        r"step     2/4  loss 3\.7500  lr 1\.00e-03  gnorm 0\.750  12,346 tok/s  MFU 3\.12%  "
        r"mem 3\.00 GiB  ETA \d+m\d\ds  val_loss 3\.2500",
        lines[0],
    ), lines[0]
    assert "\x1b[" not in out  # no colour codes in a file
    assert lines[-1] == "done: 4 steps"


def test_a_terminal_gets_a_live_progress_bar() -> None:
    out = _feed(Console(file=io.StringIO(), force_terminal=True, width=160), interval=1)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out)  # drop the cursor/colour codes
    assert "\x1b[" in out and "gnorm" not in text  # the bar, not the plain lines
    assert "━" in text  # rich's bar
    assert "4/4" in text and "loss 3.5000" in text and "12,346 tok/s" in text
    assert "MFU 3.12%" in text and "ETA" in text
    assert "done: 4 steps" in text


def test_the_bar_follows_the_steps_and_keeps_the_validation_loss() -> None:
    sink = ConsoleSink(STEPS, 1, Console(file=io.StringIO(), force_terminal=True))
    seen = []
    for step in range(1, STEPS + 1):
        sink.log(_metrics(step))
        assert sink.progress is not None
        (task,) = sink.progress.tasks
        seen.append((task.completed, task.total, task.fields["stats"]))
    sink.close()
    assert [s[:2] for s in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert seen[0][2] == "loss 3.8750  12,346 tok/s  MFU 3.12%"
    assert [s[2].endswith("  val_loss 3.2500") for s in seen] == [False, True, True, True]
