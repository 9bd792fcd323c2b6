"""On two ranks: a second run on a held run directory and a resume that cannot continue are
refused on every rank with one line, writing nothing; a changed schedule resumes with the new
schedule's learning rate and one warning."""

from __future__ import annotations

from pathlib import Path

import pytest

from scaletrain.config import load_config
from scaletrain.train.run_dir import RunLock, read_holder
from scaletrain.train.schedule import lr_at
from tests.distributed import (
    TINY,
    printed_by_ranks,
    read_metrics,
    train_unchecked,
)

pytestmark = pytest.mark.slow


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_refusals_on_every_rank_and_a_resume_with_a_new_schedule(
    stdlib_data: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    first = train_unchecked(2, run, stdlib_data, "train.steps=4", "checkpoint.interval=2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4]

    # A live run holds the directory (this process): the ranks agree and both refuse.
    holder = RunLock(run)
    holder.acquire()
    try:
        record = read_holder(run)
        assert record is not None
        before = snapshot(run)
        done = train_unchecked(2, run, stdlib_data, "train.steps=6")
        line = (
            f"train.run_dir: {run} is in use by another run ({record.describe()}); stop that "
            "run first, or use another train.run_dir"
        )
        assert done.returncode == 1  # torchrun's code for failed workers; each rank exits 2
        assert printed_by_ranks(done.stderr, line) == 2, done.stderr[-3000:]
        assert snapshot(run) == before
    finally:
        holder.release()

    # A resume that cannot continue: refused on both ranks before DeepSpeed is imported.
    before = snapshot(run)
    done = train_unchecked(2, run, stdlib_data, "model.num_heads=2")
    line = (
        f"resume: cannot continue {run}/checkpoints/step_00000004: it was saved by another setup "
        "(model.num_heads 4 -> 2); use a new train.run_dir, checkpoint.resume=none, or "
        "checkpoint.load_weights_only=true for a deliberate change of the training setup"
    )
    assert done.returncode == 1
    assert printed_by_ranks(done.stderr, line) == 2, done.stderr[-3000:]
    assert "deepspeed" not in done.stderr.lower()  # it never got that far
    assert snapshot(run) == before

    # train.steps 4 -> 6 is allowed: step 5 follows the new schedule, said once.
    old_metrics = (run / "metrics.jsonl").read_text().splitlines()
    old_config = (run / "config.step_0.yaml").read_bytes()
    done = train_unchecked(2, run, stdlib_data, "train.steps=6")
    assert done.returncode == 0, done.stderr[-3000:]
    config = load_config(TINY, ["train.steps=6"])
    lr_old = lr_at(4, config.optim, 4)
    # As LambdaLR computes it (peak lr times the schedule's factor), bit for bit.
    lr_new = [config.optim.lr * (lr_at(s, config.optim, 6) / config.optim.lr) for s in (4, 5)]
    warning = (
        "resume: the learning-rate schedule changed (train.steps 4 -> 6): step 5 uses lr "
        f"{lr_new[0]:.4g} (the saved schedule had {lr_old:.4g} there), then follows the new "
        "schedule to 0.0003 at step 6"
    )
    lines = done.stderr.splitlines()
    warned = [line.split(" WARNING ", 1)[1] for line in lines if " WARNING " in line]
    assert warned == [warning]
    metrics = read_metrics(run)
    assert (run / "metrics.jsonl").read_text().splitlines()[:4] == old_metrics
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert [m["lr"] for m in metrics[4:]] == lr_new
    assert (run / "config.step_0.yaml").read_bytes() == old_config
    assert "steps: 6" in (run / "config.step_4.yaml").read_text()
    assert (run / "config.yaml").read_bytes() == (run / "config.step_4.yaml").read_bytes()
