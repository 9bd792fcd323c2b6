"""Real SLURM jobs on the one-machine cluster, and `launch local`: every way a run is stopped
(time limit, `scancel --signal=USR1 --batch`, a chain's first job, a signal to the local
launcher) saves, resumes and ends with the loss curve of an uninterrupted run, compared with ==
(one thread per rank: the CPU is deterministic).

The uninterrupted runs are module fixtures, submitted once. A requeued job waits ~120 s
(BeginTime) before it may run again; the tests release it at once with
`scontrol update StartTime=now`.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from scaletrain.launch.status import scontrol_job
from tests.distributed import REPO, TINY, rank_env, read_metrics, run_cli

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Steps of ~10 ms of compute per rank at 2 ranks: large enough that a stop request lands
# mid-run, small enough to start and finish in seconds.
SHAPE = (
    "train.seq_len=128",
    "train.global_batch=16",
    "train.micro_batch=8",
    "train.eval_batches=1",
)
SHORT = (*SHAPE, "train.steps=30", "train.eval_interval=10")
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def curve(metrics: list[dict]) -> list[tuple]:
    return [(m["step"], m["loss"], m.get("val_loss"), m["lr"]) for m in metrics]


def submit(run_dir: Path, data: Path, *overrides: str, chain: int = 1) -> list[str]:
    """`scaletrain launch slurm --cluster local --submit` for the tiny config; the job ids."""
    done = run_cli(
        "launch", "slurm", "--config", str(TINY), "--cluster", "local", "--submit",
        "--chain", str(chain), f"data.paths=[{data}]", f"train.run_dir={run_dir}", *overrides,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    ids = [line.split()[2] for line in done.stdout.splitlines() if line.startswith("submitted job")]
    assert len(ids) == chain, done.stdout
    assert f"metrics: {run_dir / 'metrics.jsonl'}" in done.stdout
    return ids


def job(job_id: str) -> dict[str, str]:
    info = scontrol_job(job_id)
    assert info is not None, f"SLURM does not know job {job_id}"
    return info


def wait_job(job_id: str, until, what: str, timeout: float = 300) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job(job_id)
        if until(info):
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job_id}: {what} not reached in {timeout}s: {job(job_id)}")


def wait_done(job_id: str, timeout: float = 300) -> dict[str, str]:
    return wait_job(job_id, lambda i: i["JobState"] in DONE, "the end", timeout)


def wait_step(run_dir: Path, step: int, job_id: str, timeout: float = 300) -> None:
    """Until metrics.jsonl holds `step` (fails if the job ends first)."""
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) > step:
            return
        assert job(job_id)["JobState"] not in DONE, f"job {job_id} ended before step {step}"
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def release_requeued(job_id: str, *settings: str) -> None:
    """The job requeued itself: let it run again now instead of after its ~120 s BeginTime."""
    wait_job(
        job_id,
        lambda i: i["JobState"] == "PENDING" and int(i["Restarts"]) >= 1,
        "requeue",
        timeout=180,
    )
    # Started again within the second slurmd revoked the previous run's credential (its
    # times have 1 s resolution), the job is killed at once ("Job credential revoked"): wait
    # for the node to be idle, then for the clock to pass that second.
    deadline = time.monotonic() + 60
    while node_state() != "idle":
        assert time.monotonic() < deadline, f"node stays {node_state()!r} after the requeue"
        time.sleep(0.2)
    time.sleep(2)
    command = ["scontrol", "update", f"jobid={job_id}", "StartTime=now", *settings]
    subprocess.run(command, check=True)


def node_state() -> str:
    """The local partition's node state as sinfo prints it (idle, mixed, completing, ...)."""
    done = subprocess.run(
        ["sinfo", "-h", "-p", "local", "-o", "%T"], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def job_log(run_dir: Path, job_id: str) -> str:
    return (run_dir / "slurm" / f"{run_dir.name}-{job_id}.out").read_text()


def job_err(run_dir: Path, job_id: str) -> str:
    return (run_dir / "slurm" / f"{run_dir.name}-{job_id}.err").read_text()


def stopped_step(text: str) -> int:
    line = next(line for line in text.splitlines() if "stopped after step" in line)
    return int(line.split("stopped after step ")[1].split()[0])


@pytest.fixture(scope="module")
def short_run(slurm_cluster: str, stdlib_data: Path, tmp_path_factory) -> tuple[Path, str]:
    """The short config, uninterrupted, as a SLURM job: (run dir, job id)."""
    run_dir = tmp_path_factory.mktemp("slurm") / "short"
    (job_id,) = submit(run_dir, stdlib_data, *SHORT)
    wait_done(job_id)
    return run_dir, job_id


def training_ranks(run_dir: Path) -> list[psutil.Process]:
    """The ranks the job's agent started (children of `python3 -m scaletrain.launch.agent`)."""
    config = str(run_dir / "slurm" / "config.yaml")
    launchers = [
        proc
        for proc in psutil.process_iter(["cmdline"])
        if config in (proc.info["cmdline"] or [])
        and "scaletrain.launch.agent" in proc.info["cmdline"]
    ]
    ranks = [child for launcher in launchers for child in launcher.children()]
    assert ranks, f"no ranks of {config} found"
    return ranks


def wait_log(run_dir: Path, job_id: str, text: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "slurm" / f"{run_dir.name}-{job_id}.out"
    while not (path.exists() and text in path.read_text()):
        assert time.monotonic() < deadline, f"{text!r} not in the log of job {job_id}"
        time.sleep(0.5)


def test_submitted_job_trains_every_step(short_run: tuple[Path, str]) -> None:
    run_dir, job_id = short_run
    info = job(job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0")
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 31))
    log = job_log(run_dir, job_id)
    assert f"scaletrain: job {job_id} start: restart 0, nodes " in log
    assert f"scaletrain: job {job_id} end: exit 0" in log
    assert "requeue" not in log  # a finished run is not requeued
    status = run_cli("launch", "status", str(run_dir))
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[1].split()[:5] == [job_id, "COMPLETED", "0", lines[1].split()[3], "0:0"]
    last = read_metrics(run_dir)[-1]
    assert f"progress: step 30/30, loss {last['loss']:.4f}" in status.stdout


def test_scancel_usr1_saves_requeues_and_resumes_exactly(
    short_run: tuple[Path, str], stdlib_data: Path, tmp_path: Path
) -> None:
    want = read_metrics(short_run[0])
    run_dir = tmp_path / "scancel"
    (job_id,) = submit(run_dir, stdlib_data, *SHORT)
    wait_step(run_dir, 3, job_id)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    release_requeued(job_id)
    info = wait_done(job_id)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1")
    log = job_log(run_dir, job_id)
    assert "got SIGUSR1: asking training to save and stop" in log
    assert "stopped resumably (exit 75): requeue" in log
    assert f"scaletrain: job {job_id} start: restart 1, nodes " in log  # SLURM_RESTART_COUNT
    stopped = stopped_step(job_err(run_dir, job_id))
    assert 3 <= stopped < 30, stopped
    assert "resumed from" in job_err(run_dir, job_id)
    assert curve(read_metrics(run_dir)) == curve(want)


def test_chain_of_two_jobs_completes_the_run(
    short_run: tuple[Path, str], stdlib_data: Path, tmp_path: Path
) -> None:
    want = read_metrics(short_run[0])
    run_dir = tmp_path / "chain"
    first, second = submit(run_dir, stdlib_data, *SHORT, chain=2)
    assert job(second)["Dependency"] == f"afterany:{first}(unfulfilled)"
    wait_step(run_dir, 3, first)
    subprocess.run(["scancel", "--signal=USR1", "--batch", first], check=True)
    one = wait_done(first)
    assert (one["JobState"], one["ExitCode"], one["Restarts"]) == ("FAILED", "75:0", "0")
    two = wait_done(second)
    assert (two["JobState"], two["ExitCode"]) == ("COMPLETED", "0:0")
    assert "the next job of the chain resumes" in job_log(run_dir, first)
    assert stopped_step(job_err(run_dir, first)) < 30
    assert "resumed from" in job_err(run_dir, second)
    assert curve(read_metrics(run_dir)) == curve(want)
    records = [json.loads(x) for x in (run_dir / "slurm" / "jobs.jsonl").read_text().splitlines()]
    assert [(r["job_id"], r["after"]) for r in records] == [(first, None), (second, first)]


def test_time_limit_signal_saves_requeues_and_resumes_exactly(
    short_run: tuple[Path, str], stdlib_data: Path, tmp_path: Path
) -> None:
    """The job's time limit runs out mid-run. SLURM checks limits every 30 s and sends the
    `--signal` up to 30 s before `lead`, so the limit is set once training runs (an admin's
    `scontrol update TimeLimit=`), and the ranks are frozen (SIGSTOP) until the batch shell has
    the signal: on any machine speed, training is then still mid-run when the stop arrives."""
    want = read_metrics(short_run[0])
    run_dir = tmp_path / "timelimit"
    lead = 90
    (job_id,) = submit(
        run_dir, stdlib_data, *SHORT, "cluster.time=10", f"cluster.signal_lead_seconds={lead}"
    )
    wait_step(run_dir, 3, job_id)
    ranks = training_ranks(run_dir)
    for rank in ranks:
        rank.suspend()
    try:
        elapsed = _seconds(job(job_id)["RunTime"])
        minutes = math.ceil((elapsed + 60) / 60)  # the limit is 60-120 s away: within lead + 30
        command = ["scontrol", "update", f"jobid={job_id}", f"TimeLimit={minutes}"]
        subprocess.run(command, check=True)
        wait_log(run_dir, job_id, "got SIGUSR1")
    finally:
        for rank in ranks:
            rank.resume()
    release_requeued(job_id, "TimeLimit=10")  # the next run has its full limit again
    info = wait_done(job_id)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1")
    log = job_log(run_dir, job_id)
    assert "got SIGUSR1: asking training to save and stop" in log
    assert "DUE TO TIME LIMIT" not in log + job_err(run_dir, job_id)  # saved before the limit
    assert f"scaletrain: job {job_id} start: restart 1, nodes " in log  # SLURM_RESTART_COUNT
    assert 3 <= stopped_step(job_err(run_dir, job_id)) < 30
    assert curve(read_metrics(run_dir)) == curve(want)


def test_launch_local_forwards_signals_exits_75_and_resumes_exactly(
    short_run: tuple[Path, str], stdlib_data: Path, tmp_path: Path
) -> None:
    want = read_metrics(short_run[0])
    args = (
        "launch", "local", "--nproc", "2", "--config", str(TINY), f"data.paths=[{stdlib_data}]",
        f"train.run_dir={tmp_path}", *SHORT,
    )  # fmt: skip
    log = (tmp_path / "launcher.log").open("w")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "scaletrain", *args],
        cwd=REPO,
        env=rank_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    path = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (path.exists() and len(path.read_text().splitlines()) >= 3):
        assert launcher.poll() is None and time.monotonic() < deadline, "no step 3"
        time.sleep(0.1)
    launcher.send_signal(signal.SIGUSR1)
    assert launcher.wait(timeout=120) == 75  # torchrun itself exits 1
    output = (tmp_path / "launcher.log").read_text()
    stopped = stopped_step(output)
    assert 3 <= stopped < 30
    assert f"step_{stopped:08d}" == (tmp_path / "checkpoints" / "latest").read_text().strip()
    checkpoint = tmp_path / "checkpoints" / f"step_{stopped:08d}"
    assert output.splitlines()[-1] == (
        f"stopped after step {stopped} (signal SIGTERM); checkpoint {checkpoint} saved; "
        "run the same command to resume"
    )

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert curve(read_metrics(tmp_path)) == curve(want)


def test_a_job_whose_ranks_refuse_exits_2_with_their_line(
    slurm_cluster: str, stdlib_data: Path, tmp_path: Path
) -> None:
    """The data exists only "on the cluster" for `launch slurm` (it skips reading it), and
    not there either: the ranks refuse. The job's code is theirs and both logs end with it."""
    run_dir = tmp_path / "refused"
    missing = tmp_path / "nowhere"
    (job_id,) = submit(
        run_dir, stdlib_data, *SHORT, f"data.paths=[{missing}]", "model.vocab_size=512"
    )
    info = wait_done(job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0")
    line = (
        f"config error: data.paths[0]: '{missing}' has no metadata.json; run "
        f"`scaletrain data prepare --output {missing} ...`"
    )
    log, err = job_log(run_dir, job_id).splitlines(), job_err(run_dir, job_id).splitlines()
    assert log[-1] == line and err[-1] == line
    assert log[-2].startswith(f"scaletrain: job {job_id} end: exit 2 (")
    assert "Traceback" not in job_err(run_dir, job_id) and "requeue" not in "\n".join(log)
    assert not (run_dir / "metrics.jsonl").exists()


def _seconds(runtime: str) -> int:
    """SLURM's [D-]HH:MM:SS as seconds."""
    days, _, clock = runtime.rpartition("-")
    h, m, s = (int(x) for x in clock.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s
