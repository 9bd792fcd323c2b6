"""Launchers pass the rank's exit code on and end with its one line.

`scaletrain.launch.agent` (torchrun's agent in-process: what `launch local` and the sbatch
script start) is driven with a rank script that ends as told in a second (tests/launch/
rank_exit.py), through every way the ranks can end: a recorded refusal, a silent kill, a stop
signal to the agent. One real run through `launch local` stops on its time limit. The `torchrun`
command exits 1 with a ChildFailedError traceback in every one of these cases.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from scaletrain.launch.outcome import Outcome, first_outcome, read_outcomes, record_exit
from tests.distributed import REPO, TINY, rank_env, run_cli
from tests.launch.rank_exit import REFUSAL, STOPPED

AGENT = [sys.executable, "-m", "scaletrain.launch.agent", "--standalone", "--nproc-per-node=2"]
RANK = str(Path(__file__).with_name("rank_exit.py"))


def agent(mode: str, folder: Path) -> subprocess.CompletedProcess:
    command = [*AGENT, RANK, mode, str(folder)]
    env = rank_env()
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def last_line(text: str) -> str:
    return text.rstrip("\n").splitlines()[-1]


def test_a_recorded_exit_is_what_torchelastic_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    error_file = tmp_path / "run_x" / "attempt_0" / "1" / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("RANK", "1")
    record_exit(2, "config error: x: bad\nnot this line")
    failure = ProcessFailure(local_rank=1, pid=1, exitcode=2, error_file=str(error_file))
    assert failure.message == "config error: x: bad"  # torch's own summary shows our line
    (outcome,) = read_outcomes(tmp_path)
    assert (outcome.code, outcome.message, outcome.rank) == (2, "config error: x: bad", 1)
    later = tmp_path / "run_x" / "attempt_1" / "0" / "error.json"  # a restart's own records
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(later))
    record_exit(75, "stopped")
    assert [(o.code, o.message) for o in read_outcomes(tmp_path)] == [(75, "stopped")]


def test_the_earliest_outcome_is_the_cause() -> None:
    hang = Outcome(124, "rank 1: no progress", rank=1, time=10.0)
    stop = Outcome(75, "stopped", rank=0, time=11.0)
    assert first_outcome([stop, hang]) == hang
    assert first_outcome([Outcome(2, "b", 1, 5.0), Outcome(2, "a", 0, 5.0)]).rank == 0
    assert first_outcome([]) is None


@pytest.mark.slow
def test_a_ranks_refusal_is_the_exit_code_and_the_last_line(tmp_path: Path) -> None:
    done = agent("record", tmp_path)
    assert (done.returncode, last_line(done.stderr)) == (2, REFUSAL)
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr


@pytest.mark.slow
def test_a_rank_killed_without_a_word_is_named(tmp_path: Path) -> None:
    done = agent("kill", tmp_path)
    assert done.returncode == 128 + signal.SIGKILL
    assert last_line(done.stderr) == (
        "rank 1 was killed by SIGKILL without a message (a crash: its output above says why)"
    )
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_stop_signal_to_the_agent_ends_with_the_ranks_75(tmp_path: Path) -> None:
    """torch turns SIGTERM into SignalException and keeps no exit codes: the records say 75."""
    proc = subprocess.Popen(
        [*AGENT, RANK, "stop", str(tmp_path)],
        cwd=REPO,
        env=rank_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready.{rank}").exists() for rank in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, "the ranks did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, last_line(err)) == (75, STOPPED)
    assert "Traceback" not in err


@pytest.mark.slow
def test_launch_local_ends_with_the_ranks_code_and_line(stdlib_data: Path, tmp_path: Path) -> None:
    """A real run that stops on its time limit: exit 75 and the ranks' own last words."""
    done = run_cli(
        "launch", "local", "--nproc", "2", "--config", str(TINY), f"data.paths=[{stdlib_data}]",
        f"train.run_dir={tmp_path}", "train.steps=100000", "train.time_limit='0:03'",
    )  # fmt: skip
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    step = int(latest.removeprefix("step_"))
    assert (done.returncode, last_line(done.stderr)) == (
        75,
        f"stopped after step {step} (time limit); checkpoint {tmp_path / 'checkpoints' / latest} "
        "saved; run the same command to resume",
    )
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr
