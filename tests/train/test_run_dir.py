"""One owner per run directory, and the checks that refuse a run before any process group.

In-process and cheap: the lock is exercised against real other processes (a holder that is
alive, then `kill -9`'d); a shared file system whose flock is a no-op or unsupported is played
by holder records of live processes and by an flock that raises ENOSYS (Lustre's default).
The read-only run directory is a real read-only bind mount (we are root, so permission bits
would not stop a write).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import psutil
import pytest

from scaletrain.errors import ScaletrainError
from scaletrain.train import run_dir as run_dir_module
from scaletrain.train.run_dir import (
    LOCK_FILE,
    OWNER_FILE,
    STALE_SECONDS,
    Holder,
    RunLock,
    read_holder,
)
from tests.distributed import REPO, TINY, rank_env, run_cli

HOLD = """
import sys, time
from scaletrain.train.run_dir import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: 'nothing was written' compares two of these."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def start_holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)],
        cwd=REPO,
        env=rank_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def expected_refusal(run_dir: Path, holder: Holder) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.since))
    job = f", SLURM job {holder.slurm_job_id}" if holder.slurm_job_id else ""
    return (
        f"train.run_dir: {run_dir} is in use by another run (host {holder.host}, pid "
        f"{holder.pid}{job}, since {since}); stop that run first, or use another train.run_dir"
    )


def test_a_live_holder_refuses_a_second_run_and_a_kill_9_does_not_block_the_restart(
    stdlib_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    holder_proc = start_holder(tmp_path)
    try:
        record = read_holder(tmp_path)
        assert record is not None and record.pid == holder_proc.pid
        before = snapshot(tmp_path)
        with pytest.raises(ScaletrainError) as refused:
            RunLock(tmp_path).acquire()
        assert str(refused.value) == expected_refusal(tmp_path, record)
        # `launch local` asks before torchrun starts: exit 2, the same line, no rank output.
        launch = ("launch", "local", "--nproc", "2", "--config", str(TINY))
        launch += (f"data.paths=[{stdlib_data}]", f"train.run_dir={tmp_path}")
        assert cli(*launch) == (2, [expected_refusal(tmp_path, record)])
        assert snapshot(tmp_path) == before  # the refused runs wrote nothing
        (tmp_path / OWNER_FILE).unlink()  # no record (deleted by hand): the flock still holds
        with pytest.raises(ScaletrainError) as refused:
            RunLock(tmp_path).acquire()
        assert str(refused.value) == (
            f"train.run_dir: {tmp_path} is in use by another run (a process that has not written "
            "owner.json yet); stop that run first, or use another train.run_dir"
        )
        (tmp_path / OWNER_FILE).write_bytes(before[OWNER_FILE])
    finally:
        holder_proc.send_signal(signal.SIGKILL)
        holder_proc.wait()
    # The kernel dropped the flock; the record stays behind and names a dead process.
    assert read_holder(tmp_path) == record
    lock = RunLock(tmp_path)
    with caplog.at_level(logging.WARNING, logger="scaletrain"):
        lock.acquire()
    assert [r.getMessage() for r in caplog.records] == [
        f"train.run_dir {tmp_path}: the previous holder ({record.describe()}) is gone; taking over"
    ]
    mine = read_holder(tmp_path)
    assert mine is not None and mine.pid == os.getpid()
    lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]  # the record went with it


def test_a_checkpoint_dir_outside_the_run_dir_is_owned_too(
    stdlib_data: Path, tmp_path: Path
) -> None:
    """Two runs with their own run directories but one `checkpoint.dir` would mix their
    checkpoints: the second is refused, naming checkpoint.dir, and keeps no lock of its own."""
    from scaletrain.config import load_config
    from scaletrain.train.run_dir import locked_folders, own_run_dir

    shared, run = tmp_path / "shared-checkpoints", tmp_path / "run"
    overrides = [f"data.paths=[{stdlib_data}]", f"train.run_dir={run}"]
    config = load_config(TINY, [*overrides, f"checkpoint.dir={shared}"])
    assert locked_folders(config) == {"train.run_dir": run, "checkpoint.dir": shared}
    inside = load_config(TINY, [*overrides, f"checkpoint.dir={run / 'ckpt'}"])
    assert locked_folders(inside) == {"train.run_dir": run}  # the run directory's lock covers it

    holder_proc = start_holder(shared)
    try:
        record = read_holder(shared)
        assert record is not None
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.since))
        line = (
            f"checkpoint.dir: {shared} is in use by another run (host {record.host}, pid "
            f"{record.pid}, since {since}); stop that run first, or use another checkpoint.dir"
        )
        with pytest.raises(ScaletrainError) as refused:
            own_run_dir(locked_folders(config), rank=0, world_size=1)
        assert str(refused.value) == line
        assert read_holder(run) is None  # the run directory's lock was given back
        launch = ("launch", "local", "--nproc", "2", "--config", str(TINY), *overrides)
        assert cli(*launch, f"checkpoint.dir={shared}") == (2, [line])
    finally:
        holder_proc.send_signal(signal.SIGKILL)
        holder_proc.wait()
    locks = own_run_dir(locked_folders(config), rank=0, world_size=1)  # the holder is gone
    assert [lock.field for lock in locks] == ["train.run_dir", "checkpoint.dir"]
    for lock in locks:
        lock.release()


@pytest.fixture
def sleeper() -> psutil.Process:
    """A live process of this host to name in a holder record."""
    proc = subprocess.Popen(["sleep", "600"])
    yield psutil.Process(proc.pid)
    proc.kill()
    proc.wait()


def write_record(run_dir: Path, holder: Holder) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / OWNER_FILE).write_text(json.dumps(asdict(holder)))


@pytest.mark.parametrize("flock", ["no-op", "ENOSYS"])
def test_where_flock_does_not_lock_the_holder_record_decides(
    flock: str,
    tmp_path: Path,
    sleeper: psutil.Process,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if flock == "no-op":  # NFS `nolock`, Lustre `localflock` seen from another node
        monkeypatch.setattr(run_dir_module.fcntl, "flock", lambda fd, op: None)
    else:  # Lustre without the flock mount option

        def unsupported(fd: int, op: int) -> None:
            raise OSError(errno.ENOSYS, "Function not implemented")

        monkeypatch.setattr(run_dir_module.fcntl, "flock", unsupported)
    now = time.time()
    here = Holder(
        host=Holder.me().host,
        pid=sleeper.pid,
        pid_started=sleeper.create_time(),
        since=now - 3600,
        updated=now - 5,
    )
    elsewhere = replace(here, host="node-17", pid=4242, pid_started=1.0, updated=now - 10)
    for live in (here, elsewhere):  # a live process here; a fresh record from another node
        write_record(tmp_path, live)
        before = snapshot(tmp_path)
        with pytest.raises(ScaletrainError) as refused:
            RunLock(tmp_path).acquire()
        assert str(refused.value) == expected_refusal(tmp_path, live)
        assert snapshot(tmp_path) == before

    stale = replace(elsewhere, updated=now - STALE_SECONDS - 30)
    requeued = replace(elsewhere, slurm_job_id="777", slurm_restart=1)
    reused_pid = replace(here, pid_started=here.pid_started - 100)  # same pid, another process
    cases = [
        (stale, f"the holder record ({stale.describe()}) is {STALE_SECONDS + 30:.0f}s old"),
        (requeued, None),
        (reused_pid, f"the previous holder ({reused_pid.describe()}) is gone"),
    ]
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    for record, warning in cases:
        write_record(tmp_path, record)
        caplog.clear()
        lock = RunLock(tmp_path)
        with caplog.at_level(logging.INFO, logger="scaletrain"):
            lock.acquire()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == (
            [f"train.run_dir {tmp_path}: {warning}; taking over"] if warning else []
        )
        taken = read_holder(tmp_path)
        assert taken is not None and (taken.host, taken.pid) == (here.host, os.getpid())
        lock.release()
    if flock == "ENOSYS":
        infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        assert any(m.startswith(f"flock is not supported on {tmp_path}") for m in infos)


def cli(*args: str) -> tuple[int, list[str]]:
    done = run_cli(*args, timeout=120)
    return done.returncode, done.stderr.splitlines()


def test_run_dirs_that_cannot_work_are_refused_before_any_process_group(
    stdlib_data: Path, tmp_path: Path
) -> None:
    """Each case through `config check` and `train` (one process; it fails before DeepSpeed is
    imported, so before any process group): exit 2, one line, nothing written."""
    base = ("--config", str(TINY), f"data.paths=[{stdlib_data}]")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    (read_only / "config.yaml").write_text("kept: true\n")
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(read_only), str(read_only)])
    assert mounted.returncode == 0, "a read-only bind mount needs root (as launch/test.sh has)"
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(read_only)], check=True)
        empty_val = tmp_path / "empty-val"
        from scaletrain.data import prepare_dataset, stdlib_sources

        prepare_dataset(
            stdlib_sources()[:3],
            empty_val,
            tokenizer=stdlib_data / "tokenizer",
            val_fraction=0.0,
            num_proc=1,
        )
        run = tmp_path / "run"
        run.mkdir()
        cases = {
            f"train.run_dir={a_file}": f"config error: train.run_dir: {a_file} is a file, not a "
            "folder; choose a folder",
            f"train.run_dir={a_file}/sub": f"config error: train.run_dir: {a_file}/sub is inside "
            f"{a_file}, which is a file, not a folder; choose a folder",
            f"train.run_dir={read_only}": f"config error: train.run_dir: {read_only} is on a "
            "read-only file system; choose a writable folder",
            f"data.paths=[{empty_val}]": f"config error: data.paths[0]: the val split of "
            f"'{empty_val}' is empty; one window needs train.seq_len + 1 = 33 tokens; prepare it "
            "with a larger --val-fraction, or set train.eval_interval=0",
            "checkpoint.resume=/nonexistent": "config error: checkpoint.resume: /nonexistent does "
            "not exist; give a checkpoint folder (e.g. <run_dir>/checkpoints/step_00000120), auto "
            "or none",
        }
        for override, line in cases.items():
            words = (*base, f"train.run_dir={run}", override)
            before = snapshot(tmp_path)
            assert cli("config", "check", "--world-size", "2", *words) == (2, [line])
            assert cli("train", *words) == (2, [line]), override
            assert snapshot(tmp_path) == before, override
        assert sorted(p.name for p in run.iterdir()) == []
    finally:
        subprocess.run(["umount", str(read_only)], check=True)
