"""The user-facing commands end to end: data prepare, launch local, blended data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed import TINY, read_metrics, run_cli, train

pytestmark = pytest.mark.slow


def test_launch_local_trains_and_prints_final_losses(stdlib_data: Path, tmp_path: Path) -> None:
    command = ("launch", "local", "--nproc", "2", "--config", str(TINY))
    command += (f"data.paths=[{stdlib_data}]", f"train.run_dir={tmp_path}", "parallel.zero_stage=1")
    done = run_cli(*command)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    last = metrics[-1]
    summary = (
        f"done: 6 steps, final train loss {last['loss']:.4f}, "
        f"validation loss {last['val_loss']:.4f}"
    )
    assert summary in done.stdout
    assert (tmp_path / "config.yaml").read_text().count("zero_stage: 1") == 1

    again = run_cli(*command)  # the finished run resumes from its final checkpoint
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        f"nothing to do: {tmp_path} is complete at step 6 (train.steps); set "
        "checkpoint.resume=none or a new train.run_dir to train again"
    ) in again.stdout
    assert read_metrics(tmp_path) == metrics


def test_launch_local_rejects_a_bad_layout_before_starting(stdlib_data: Path) -> None:
    done = run_cli(
        "launch",
        "local",
        "--nproc",
        "3",
        "--config",
        str(TINY),
        f"data.paths=[{stdlib_data}]",
        "parallel.tp=2",
    )
    assert done.returncode == 2
    assert done.stderr == (
        "config error: parallel: world size (3) is not divisible by tp (2) * pp (1); "
        "change tp/pp or the number of ranks\n"
    )
    assert "torch.distributed.run" not in done.stdout + done.stderr


def test_prepare_with_shared_tokenizer_then_blend(stdlib_data: Path, tmp_path: Path) -> None:
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(30):
        (texts / f"doc{i}.txt").write_text(f"document {i}: " + "lorem ipsum dolor sit amet " * 40)
    second = tmp_path / "second"
    args = ["data", "prepare", "--input", str(texts), "--output", str(second)]
    args += ["--tokenizer", str(stdlib_data / "tokenizer")]
    first_run = run_cli(*args)
    assert first_run.returncode == 0, first_run.stderr[-2000:]
    metadata = second / "metadata.json"
    stamp = metadata.stat().st_mtime_ns
    again = run_cli(*args)
    assert again.returncode == 0 and metadata.stat().st_mtime_ns == stamp
    assert again.stdout == first_run.stdout
    meta = json.loads(metadata.read_text())
    assert (
        meta["vocab_size"] == json.loads((stdlib_data / "metadata.json").read_text())["vocab_size"]
    )

    blended = train(
        1,
        tmp_path / "run",
        stdlib_data,
        f"data.paths=[{stdlib_data},{second}]",
        "data.weights=[0.7,0.3]",
        "train.eval_interval=0",
    )
    assert [m["step"] for m in blended] == [1, 2, 3, 4, 5, 6]
    assert blended[-1]["loss"] < blended[0]["loss"]
