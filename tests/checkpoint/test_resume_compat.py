"""A resume refuses what it cannot continue, before any weights load and before any rank starts.

One single-process run makes the checkpoints (seconds); every refused resume is a separate
`scaletrain` process that dies in about a second (before DeepSpeed is imported) and must leave
the run directory byte for byte as it was.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from scaletrain.checkpoint.compat import resume_manifest
from scaletrain.checkpoint.manifest import read_latest
from scaletrain.config import load_config
from scaletrain.data import prepare_dataset, stdlib_sources
from scaletrain.data.fingerprint import dataset_fingerprint, tokenizer_hash
from scaletrain.data.format import read_metadata
from tests.distributed import TINY, run_cli

STEPS = ("train.steps=4", "checkpoint.interval=2")
WAYS_OUT = (
    "use a new train.run_dir, checkpoint.resume=none, or checkpoint.load_weights_only=true "
    "for a deliberate change of the training setup"
)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def words(data: Path, run: Path, *overrides: str) -> tuple[str, ...]:
    return ("--config", str(TINY), f"data.paths=[{data}]", f"train.run_dir={run}", *overrides)


@pytest.fixture(scope="module")
def saved_run(stdlib_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run (checkpoints at steps 2 and 4), trained once for this module."""
    run = tmp_path_factory.mktemp("compat") / "run"
    done = run_cli("train", *words(stdlib_data, run, *STEPS))
    assert done.returncode == 0, done.stderr[-2000:]
    return run


@pytest.fixture(scope="module")
def other_data(stdlib_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Same sample count, other tokens (the first 4096 token ids of the train split reversed);
    and a data set with another tokenizer (vocabulary 600, padded to 640)."""
    root = tmp_path_factory.mktemp("other-data")
    same_size = root / "same-size"
    shutil.copytree(stdlib_data, same_size)
    shard = same_size / "train" / "shard_00000.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[:4096] = ids[:4096][::-1].copy()
    ids.tofile(shard)
    retokenized = root / "vocab-600"
    prepare_dataset(
        stdlib_sources()[:40], retokenized, vocab_size=600, val_fraction=0.1, num_proc=1
    )
    return {"same-size": same_size, "vocab-600": retokenized}


def test_fingerprint_follows_the_tokens_not_the_folder(
    stdlib_data: Path, other_data: dict[str, Path], tmp_path: Path
) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(stdlib_data, moved)
    assert dataset_fingerprint(moved) == dataset_fingerprint(stdlib_data)
    assert dataset_fingerprint(other_data["same-size"]) != dataset_fingerprint(stdlib_data)


def test_a_resume_that_changes_what_the_state_means_is_refused_and_changes_nothing(
    saved_run: Path, stdlib_data: Path, other_data: dict[str, Path]
) -> None:
    step4 = saved_run / "checkpoints" / "step_00000004"
    old_fp = dataset_fingerprint(stdlib_data)[:12]
    same_fp = dataset_fingerprint(other_data["same-size"])[:12]
    new_fp = dataset_fingerprint(other_data["vocab-600"])[:12]
    old_tok = json.loads((step4 / "manifest.json").read_text())["identity"]["tokenizer"][:12]
    new_tok = tokenizer_hash(read_metadata(other_data["vocab-600"]))[:12]
    cases = [
        ((stdlib_data, "model.hidden_size=96"), "model.hidden_size 64 -> 96"),
        ((other_data["same-size"],), f"data.paths[0] {old_fp} -> {same_fp}"),
        (
            (other_data["vocab-600"],),
            f"model.padded_vocab_size 512 -> 640, tokenizer {old_tok} -> {new_tok}, "
            f"data.paths[0] {old_fp} -> {new_fp}",
        ),
        (
            (stdlib_data, "train.seq_len=64", "train.global_batch=16", "train.seed=7"),
            "train.seq_len 32 -> 64, train.global_batch 8 -> 16, train.seed 1234 -> 7",
        ),
        ((stdlib_data, "precision.dtype=bf16"), "precision.dtype fp32 -> bf16"),
    ]
    before = snapshot(saved_run)
    for i, ((data, *overrides), fields) in enumerate(cases):
        line = (
            f"resume: cannot continue {step4}: it was saved by another setup ({fields}); {WAYS_OUT}"
        )
        args = words(data, saved_run, *STEPS, *overrides)
        commands = [("train", *args)]
        if i == 0:  # the same comparison, before any process starts
            commands.append(("config", "check", "--world-size", "2", "--run-dir", str(saved_run)))
            commands[-1] += args
            commands.append(("launch", "local", "--nproc", "2", *args))
        for command in commands:
            done = run_cli(*command, timeout=120)
            assert (done.returncode, done.stderr.splitlines()) == (2, [line]), command
            assert snapshot(saved_run) == before, command  # config.yaml, metrics, checkpoints


def test_allowed_changes_pass_and_weights_only_still_needs_the_shapes(
    saved_run: Path, stdlib_data: Path
) -> None:
    check = ("config", "check", "--world-size", "2", "--run-dir", str(saved_run))
    step4 = saved_run / "checkpoints" / "step_00000004"
    allowed = (
        "train.eval_interval=2",
        "checkpoint.interval=3",
        "logging.interval=2",
        "fault.spike_zscore=4",
        "parallel.zero_stage=1",
        "model.activation_checkpointing=full",
    )
    done = run_cli(*check, *words(stdlib_data, saved_run, *STEPS, *allowed))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1:] == [f"resume: {step4} (step 4) can be continued"]

    done = run_cli(*check, *words(stdlib_data, saved_run, "train.steps=8", "optim.lr=0.001"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[2:] == [
        "warning: resume: the learning-rate schedule changed (train.steps 4 -> 8, optim.lr "
        "0.003 -> 0.001): step 5 uses lr 0.000825 (the saved schedule had 0.0003 there), then "
        "follows the new schedule to 0.0003 at step 8"
    ]

    weights_only = ("checkpoint.load_weights_only=true", "train.seq_len=64", "train.seed=7")
    done = run_cli(*check, *words(stdlib_data, saved_run, *weights_only))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1:] == [
        f"resume: the weights of {step4} fit; training starts at step 0"
    ]
    done = run_cli(*check, *words(stdlib_data, saved_run, *weights_only, "model.num_layers=3"))
    assert (done.returncode, done.stderr.splitlines()) == (
        2,
        [
            f"resume: cannot continue {step4}: its weights do not fit this model "
            "(model.num_layers 2 -> 3); use a new train.run_dir or checkpoint.resume=none"
        ],
    )


@pytest.mark.parametrize("pointer", [b"\xff\xfe\x00step", b"", b"   \n"])
def test_a_latest_pointer_that_names_nothing_counts_as_missing(
    pointer: bytes,
    saved_run: Path,
    stdlib_data: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    root = run / "checkpoints"
    (root / "latest").write_bytes(pointer)
    with caplog.at_level(logging.WARNING, logger="scaletrain"):
        assert read_latest(root) is None
    what = "is not valid UTF-8" if pointer.startswith(b"\xff") else "names no checkpoint ('')"
    assert [r.getMessage() for r in caplog.records] == [f"{root / 'latest'} {what}; ignoring it"]
    config = load_config(TINY, [f"data.paths=[{stdlib_data}]", f"train.run_dir={run}"])
    manifest = resume_manifest(config)
    assert manifest is not None and manifest.folder == root / "step_00000004"
    done = run_cli(
        "config",
        "check",
        "--world-size",
        "1",
        "--run-dir",
        str(run),
        "--config",
        str(TINY),
        f"data.paths=[{stdlib_data}]",
    )
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.splitlines()[1] == f"resume: {root / 'step_00000004'} (step 4) can be continued"
    )
