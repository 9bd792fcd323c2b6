"""The comparison rule of `scaletrain scaletest` and how it reads a run dir (fast)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from scaletrain.errors import ScaletrainError
from scaletrain.scaletest.report import Report, RunResult, compare, markdown, read_run


def _write_metrics(run_dir: Path, losses: list[float], times: list[float]) -> None:
    run_dir.mkdir(parents=True)
    lines = [
        {"step": i, "loss": loss, "step_time": t, "peak_mem_bytes": 100 + i}
        for i, (loss, t) in enumerate(zip(losses, times, strict=True), 1)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))


def test_read_run_takes_the_median_step_time_without_step_one(tmp_path: Path) -> None:
    _write_metrics(tmp_path / "run", [8.0, 7.0, 6.0, 5.0], [9.0, 0.1, 0.3, 0.2])
    run = read_run(tmp_path / "run", "x", steps=3)  # only the first K steps count
    assert run.losses == [8.0, 7.0, 6.0]
    assert run.step_time == 0.2  # median of 0.1 and 0.3; step 1's 9 s is setup
    assert run.peak_mem_bytes == [103]  # a plain run: rank 0's number at step K
    (tmp_path / "run" / "result.json").write_text(json.dumps({"peak_mem_bytes": [5, 7]}))
    assert read_run(tmp_path / "run", "x", steps=3).peak_mem_bytes == [5, 7]


def test_a_reference_shorter_than_k_steps_is_refused(tmp_path: Path) -> None:
    _write_metrics(tmp_path / "run", [8.0, 7.0], [0.1, 0.1])
    with pytest.raises(ScaletrainError, match=re.escape("has no step 3 (needs steps 1..3)")):
        read_run(tmp_path / "run", "reference", steps=3)
    with pytest.raises(ScaletrainError, match=re.escape("metrics.jsonl does not exist")):
        read_run(tmp_path / "missing", "reference", steps=3)


def test_every_step_counts_and_the_bound_is_inclusive() -> None:
    reference = RunResult("reference", [8.0, 4.0, 2.0], 0.1, [1])
    # The worst step is the middle one (relative 0.25 / 4), not the last.
    row = compare(RunResult("a", [8.0, 4.25, 2.0], 0.2, [3, 5]), reference, tolerance=0.0625)
    assert (row.max_abs_diff, row.max_rel_diff, row.ok) == (0.25, 0.0625, True)
    assert row.final_loss == 2.0 and row.peak_mem_bytes == 5
    assert not compare(RunResult("a", [8.0, 4.25, 2.0], 0.2, [3]), reference, 0.06).ok
    diverged = compare(RunResult("b", [8.0, math.nan, 2.0], 0.2, [3]), reference, 1.0)
    assert not diverged.ok  # a NaN compares false with everything: it must still fail


def test_a_plan_off_by_more_than_15_percent_is_marked_not_failed() -> None:
    reference = RunResult("reference", [8.0, 4.0], 0.1, [100])
    # planned / measured - 1 of the worst rank: -10 % (ok), +25 % and -20 % (marked).
    close = compare(RunResult("a", [8.0, 4.0], 0.1, [100, 100]), reference, 1e-5, [90.0, 95.0])
    high = compare(RunResult("b", [8.0, 4.0], 0.1, [80, 100]), reference, 1e-5, [100.0, 100.0])
    low = compare(RunResult("c", [8.0, 4.0], 0.1, [100, 50]), reference, 1e-5, [80.0, 50.0])
    errors = [close.plan_error, high.plan_error, low.plan_error]
    assert errors == pytest.approx([-0.1, 0.25, -0.2], abs=1e-12)
    assert [close.plan_deviates, high.plan_deviates, low.plan_deviates] == [False, True, True]
    assert close.planned_mem_bytes == 95.0  # the largest rank's plan
    assert close.ok and high.ok and low.ok  # a warning only: the losses decide
    unplanned = compare(RunResult("d", [8.0, 4.0], 0.1, [100]), reference, 1e-5)
    assert (unplanned.plan_error, unplanned.plan_deviates) == (None, False)
    table = Report(2, 2, "fp32", 1e-5, "x.yaml", {"losses": [8.0, 4.0], "step_time": 0.1,
                   "peak_mem_bytes": [100]}, [close, high, low, unplanned], [])  # fmt: skip
    lines = markdown(table).splitlines()
    assert "measured mem/rank (MiB) | planned (MiB) | check |" in lines[4]
    cells = [line.split(" | ")[6] for line in lines[6:10]]
    assert cells == ["0.0 (-10%)", "0.0 (+25%) !", "0.0 (-20%) !", "n/a"]
    assert lines[-1] == (
        "! planned memory off by more than 15% of the measured live tensor bytes "
        "(a warning, not a failure): b, c"
    )
    assert table.passed and table.to_json()["rows"][1]["plan_deviates"] is True
