"""Async checkpoint saves (`checkpoint.async_save`): the snapshot is the state dict's exact
copy, the files equal a synchronous save's byte for byte, a `kill -9` during the background
write leaves the previous checkpoint the newest, the resume is bit-exact, and a stop request
waits for the write before exit 75.

The multi-process part is one test of three torchruns (2 ranks, ZeRO-1): a synchronous
reference, an async run killed while a slowed write is in flight, and its resume stopped by
SIGUSR1 while the next slowed write is in flight.
"""

from __future__ import annotations

import collections
import io
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from scaletrain.checkpoint.async_save import SLOW_WRITE_ENV, HostBuffers, Snapshot
from scaletrain.checkpoint.manifest import LATEST, Manifest, check_file, list_checkpoints
from tests.checkpoint.test_disk_full import disk_full_line, small_fs  # noqa: F401 (a fixture)
from tests.distributed import (
    launcher_log,
    printed_by_ranks,
    rank_pids,
    read_metrics,
    start_training,
    train,
    train_unchecked,
    wait_for_path,
    wait_for_step,
)

Pair = collections.namedtuple("Pair", "scale shift")


class Scaler:
    """A plain object in a state dict (as DeepSpeed's loss scaler is)."""

    def __init__(self) -> None:
        self.scale = 1024.0
        self.history = torch.ones(3)


def dumped(state: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def state_dict() -> collections.OrderedDict:
    """Shared storages, views, a Parameter with megatron-style attributes, empty tensors,
    bf16, namedtuples and objects: what DeepSpeed's state dicts hold."""
    flat = torch.randn(64, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(4, 4))
    weight.tensor_model_parallel, weight.partition_dim = True, 0
    return collections.OrderedDict(
        head=flat[:8],
        body=flat[8:28].view(4, 5),
        weight=weight,
        empty=[torch.empty(0), torch.empty(0)],
        steps=torch.arange(5),
        half=torch.randn(3, 2, dtype=torch.bfloat16).t(),
        pair=Pair(2, torch.zeros(2)),
        scaler=Scaler(),
        groups=[{"lr": 0.1, "params": (0, 1)}],
    )


def test_snapshot_writes_the_sync_bytes_and_owns_its_memory() -> None:
    state = state_dict()
    want = dumped(state)
    snapshot = Snapshot()
    snapshot.add("file", state)
    snapshot.finish()
    copied = snapshot.items[0][1]
    assert dumped(copied) == want
    with torch.no_grad():  # the loop goes on training: the snapshot must not change
        state["weight"].mul_(0)
        state["body"].add_(1)
    state["scaler"].scale = 1.0
    state["groups"][0]["lr"] = 0.0
    assert dumped(copied) == want
    assert copied["weight"].partition_dim == 0 and copied["head"].requires_grad


def test_host_buffers_are_reused_from_save_to_save() -> None:
    buffers = HostBuffers()
    state = {"w": torch.randn(1000), "v": torch.randn(10)}
    first = Snapshot(buffers)
    first.add("file", state)
    pointers = {first.items[0][1][k].data_ptr() for k in state}
    first.release()
    second = Snapshot(buffers)
    second.add("file", state)
    assert {second.items[0][1][k].data_ptr() for k in state} == pointers
    assert torch.equal(second.items[0][1]["w"], state["w"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_snapshot_of_device_tensors_is_on_the_host_and_writes_the_sync_bytes() -> None:
    state = {k: v.cuda() if torch.is_tensor(v) else v for k, v in state_dict().items()}
    want = dumped(state)
    snapshot = Snapshot()
    snapshot.add("file", state)
    snapshot.finish()
    copied = snapshot.items[0][1]
    assert copied["steps"].device.type == "cpu"
    assert dumped(copied) == want  # torch.save still records cuda:0, as the sync save does


# ---- multi-process: one reference and one killed, resumed and stopped async chain --------
COMMON = (
    "train.steps=8",
    "parallel.zero_stage=1",
    "checkpoint.interval=2",
    "checkpoint.keep_last=10",
)


def files_of(folder: Path) -> list[dict]:
    manifest = Manifest.read(folder)
    assert manifest is not None, f"{folder} has no manifest"
    return manifest.files


def assert_complete(folder: Path) -> None:
    problems = [check_file(folder, entry) for entry in files_of(folder)]
    assert problems == [None] * len(problems)


def wait_for_line(path: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (path.is_file() and text in path.read_text()):
        assert proc.poll() is None, f"run ended ({proc.returncode}) before {text!r}"
        assert time.monotonic() < deadline, f"{text!r} not in {path} after {timeout}s"
        time.sleep(0.05)


def curve(metrics: list[dict]) -> list[tuple]:
    return [(m["step"], m["loss"], m.get("val_loss"), m["lr"]) for m in metrics]


@pytest.mark.slow
def test_kill_and_stop_during_async_writes(
    stdlib_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reference: synchronous, a checkpoint after every step.
    want = train(2, tmp_path / "sync", stdlib_data, *COMMON, "checkpoint.interval=1")
    sync = tmp_path / "sync" / "checkpoints"

    # kill -9 while the step-4 write is in flight (the writer sleeps before publishing).
    run = tmp_path / "async"
    root = run / "checkpoints"
    monkeypatch.setenv(SLOW_WRITE_ENV, "4:120")
    proc = start_training(2, run, stdlib_data, *COMMON, "checkpoint.async_save=true")
    wait_for_step(run, 5, proc)  # the loop went on while step 4 was being written
    wait_for_path(root / ".staging" / "step_00000004" / "rng" / "rank_00001.pt", proc)
    ranks = [psutil.Process(pid) for pid in rank_pids(proc)]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not psutil.wait_procs(ranks, timeout=60)[1], "ranks still alive"
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002"]
    assert (root / LATEST).read_text().strip() == "step_00000002"

    # Resume; SIGUSR1 while the (slowed) step-4 write is in flight: exit 75 once published.
    monkeypatch.setenv(SLOW_WRITE_ENV, "4:12")
    (run / "launcher.log").rename(run / "killed.log")  # metrics.jsonl still shows step 5
    proc = start_training(2, run, stdlib_data, *COMMON, "checkpoint.async_save=true")
    wait_for_line(run / "launcher.log", "step     5/8", proc)
    assert not (root / "step_00000004").exists(), "the step-4 write was not in flight"
    os.kill(rank_pids(proc)[-1], signal.SIGUSR1)
    proc.wait(timeout=180)
    log = launcher_log(run)
    stopped = read_metrics(run)[-1]["step"]
    assert f"stopped after step {stopped} (signal SIGUSR1)" in log
    assert "exitcode  : 75" in log or "exitcode: 75" in log
    assert (root / LATEST).read_text().strip() == f"step_{stopped:08d}"
    for step in (2, 4, stopped):
        folder = root / f"step_{step:08d}"
        assert_complete(folder)
        # The async save's files equal the synchronous save's, byte for byte.
        assert files_of(folder) == files_of(sync / folder.name), folder.name

    # The curve through a kill, a resume and a stop is the uninterrupted one, bit for bit.
    got = read_metrics(run)
    assert [m["step"] for m in got] == list(range(1, stopped + 1))
    assert curve(got) == curve(want[:stopped])


@pytest.mark.slow
def test_a_full_disk_in_the_background_write_is_one_line_at_the_end(
    stdlib_data: Path,
    small_fs: Path,  # noqa: F811 (the fixture imported above)
) -> None:
    run = small_fs / "run"  # 3 MiB: the step-2 checkpoint fits, the step-4 one does not
    done = train_unchecked(
        2, run, stdlib_data, "train.steps=4", "checkpoint.interval=2", "checkpoint.async_save=true"
    )
    root = run / "checkpoints"
    step2 = Manifest.read(root / "step_00000002")
    assert step2 is not None
    staging = root / ".staging" / "step_00000004"
    line, _ = disk_full_line(done.stderr, staging, step2.total_bytes)
    assert done.returncode == 1, done.stderr[-3000:]
    assert printed_by_ranks(done.stderr, line) == 2, done.stderr[-3000:]  # the writers agreed
    assert not staging.exists()
    assert (root / LATEST).read_text().strip() == "step_00000002"
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002"]
    assert_complete(step2.folder)
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4]
