"""Non-finite steps are skipped on every rank and counted; a run of them rolls back."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed import REPO, TINY, rank_env, read_metrics, torchrun

pytestmark = pytest.mark.slow


def run_poisoned(
    data: Path, run_dir: Path, at: str, *overrides: str, nproc: int = 2
) -> tuple[list[dict], str]:
    done = torchrun(
        nproc,
        "tests/train/fault_run.py",
        "--poison=nan",
        f"--at={at}",
        "--config",
        str(TINY),
        f"data.paths=[{data}]",
        f"train.run_dir={run_dir}",
        "train.eval_interval=0",
        *overrides,
    )
    return read_metrics(run_dir), done.stdout + done.stderr


@pytest.mark.parametrize(
    "layout",
    [("parallel.zero_stage=0",), ("parallel.zero_stage=2",), ("precision.dtype=bf16",)],
    ids=["zero0-fp32", "zero2-fp32", "zero0-bf16"],
)
def test_nan_step_is_skipped_counted_and_training_goes_on(
    layout: tuple[str, ...], stdlib_data: Path, tmp_path: Path
) -> None:
    metrics, _ = run_poisoned(stdlib_data, tmp_path, "3", *layout)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert [m["skipped"] for m in metrics] == [False, False, True, False, False, False]
    assert [m["skipped_steps"] for m in metrics] == [0, 0, 1, 1, 1, 1]
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert not math.isfinite(metrics[2]["grad_norm"])
    assert all(math.isfinite(m["grad_norm"]) for m in metrics if m["step"] != 3)
    # The skipped step does not advance the schedule: step 4 trains at step 3's lr.
    assert metrics[3]["lr"] == metrics[2]["lr"]
    assert metrics[-1]["loss"] < metrics[0]["loss"]


def test_consecutive_skips_roll_back_to_the_last_checkpoint(
    stdlib_data: Path, tmp_path: Path
) -> None:
    metrics, output = run_poisoned(
        stdlib_data,
        tmp_path,
        "5,6",
        "train.steps=8",
        "checkpoint.interval=2",
        "fault.max_consecutive_skips=2",
        "parallel.zero_stage=1",
    )
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]
    assert [m.get("rolled_back_to") for m in metrics] == [None] * 5 + [4] + [None] * 4
    assert [m["skipped"] for m in metrics] == [False] * 4 + [True, True] + [False] * 4
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert (
        "2 consecutive skipped steps at step 6: rolled back to step_00000004; "
        "the batches since are skipped"
    ) in output
    # New batches after the rollback: step 5 is not replayed on the data that failed.
    assert metrics[6]["loss"] != metrics[4]["loss"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000008"


def test_rollback_without_a_checkpoint_is_a_clear_error(stdlib_data: Path, tmp_path: Path) -> None:
    with pytest.raises(AssertionError) as failed:
        run_poisoned(stdlib_data, tmp_path, "2,3", "fault.max_consecutive_skips=2", nproc=1)
    assert (
        "fault: 2 consecutive skipped steps at step 3 and no checkpoint to roll back to; "
        "set checkpoint.interval or fix the data/learning rate"
    ) in str(failed.value)


def test_a_hung_rank_is_named_and_the_collective_timeout_ends_the_run(
    stdlib_data: Path, tmp_path: Path
) -> None:
    """Through `scaletrain.launch.agent` (what `launch local` and SLURM jobs start): exit 124
    and, as the last line, the rank's own (torchrun would say 1)."""
    started = time.monotonic()
    agent = [sys.executable, "-m", "scaletrain.launch.agent", "--standalone", "--nproc-per-node=2"]
    done = subprocess.run(
        [
            *agent,
            "tests/train/fault_run.py",
            "--poison=hang",
            "--at=3",
            "--config",
            str(TINY),
            f"data.paths=[{stdlib_data}]",
            f"train.run_dir={tmp_path}",
            "train.eval_interval=0",
            "fault.heartbeat_seconds=2",
            "fault.collective_timeout_minutes=0.5",
        ],
        cwd=REPO,
        env=rank_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = done.stdout + done.stderr
    assert "waiting for rank(s) 1 (step 3, micro-batch 0, backward)" in output
    assert "no progress for" in output and "at step 3" in output
    assert done.returncode == 124
    last = done.stderr.rstrip("\n").splitlines()[-1]
    hung = r"rank [01]: no progress for \d+s \(fault.collective_timeout_minutes\); exiting with 124"
    assert re.fullmatch(hung, last), last
    assert time.monotonic() - started < 180  # the timeout, not the 1-hour sleep, ended it
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2]
