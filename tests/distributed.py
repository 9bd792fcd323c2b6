"""Run scaletrain on N CPU ranks (torchrun, gloo) and read back what rank 0 wrote.

Every run pins one intra-op thread per rank: with two threads, two identical runs already
differ in the last bits of the loss on these CPUs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "runs" / "tiny.yaml"


def rank_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    # The venv's ninja builds DeepSpeed's CPU comm op; another ninja on PATH would rebuild it.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def torchrun_command(nproc: int, *args: str) -> list[str]:
    """`torchrun --standalone --nproc-per-node nproc <args>` with this interpreter."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*run, f"--nproc-per-node={nproc}", *args]


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`scaletrain <args>` as its own process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "scaletrain", *args],
        cwd=REPO,
        env=rank_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def torchrun(nproc: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node nproc <args>`; fails the test with rank output."""
    command = torchrun_command(nproc, *args)
    done = subprocess.run(
        command, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-60:])
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{tail}")
    return done


def run_scaletest(
    run_dir: Path,
    data: Path,
    layouts: Sequence[str],
    *overrides: str,
    world: int = 2,
    steps: int = 3,
) -> tuple[list[dict], dict[str, list[dict]]]:
    """`scaletrain scaletest` of `layouts` (one torchrun for them all); the reference's metrics
    and each layout's, after asserting it passed."""
    done = run_cli(
        "scaletest",
        "--config",
        str(TINY),
        "--world-size",
        str(world),
        "--steps",
        str(steps),
        "--layouts",
        ",".join(layouts),
        f"data.paths=[{data}]",
        f"train.run_dir={run_dir}",
        *overrides,
        timeout=1200,
    )
    assert done.returncode == 0, "\n".join((done.stdout + done.stderr).splitlines()[-40:])
    folder = run_dir / "scaletest"
    return read_metrics(folder / "reference"), {
        name: read_metrics(folder / name) for name in layouts
    }


def train_unchecked(
    nproc: int, run_dir: Path, data: Path, *overrides: str
) -> subprocess.CompletedProcess:
    """The tiny config on `nproc` ranks under plain torchrun, whatever their exit (tests of
    refusals and failures read the code and the output themselves)."""
    config = ("--config", str(TINY), f"data.paths=[{data}]", f"train.run_dir={run_dir}")
    return subprocess.run(
        torchrun_command(nproc, "-m", "scaletrain", "train", *config, *overrides),
        cwd=REPO,
        env=rank_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def train(nproc: int, run_dir: Path, data: Path, *overrides: str) -> list[dict]:
    """Train the tiny config on `nproc` ranks; returns the per-step metrics."""
    return train_with_output(nproc, run_dir, data, *overrides)[0]


def train_with_output(
    nproc: int, run_dir: Path, data: Path, *overrides: str
) -> tuple[list[dict], str]:
    """Like `train`, and also what the ranks printed (stdout + stderr)."""
    config = ("--config", str(TINY), f"data.paths=[{data}]", f"train.run_dir={run_dir}")
    done = torchrun(nproc, "-m", "scaletrain", "train", *config, *overrides)
    return read_metrics(run_dir), done.stdout + done.stderr


def assert_losses_close(got: list[dict], want: list[dict], rel: float, key: str = "loss") -> None:
    """Same steps, and every value within `rel` relative difference (0 means bit-equal)."""
    got_values = [(m["step"], m[key]) for m in got if key in m]
    want_values = [(m["step"], m[key]) for m in want if key in m]
    assert [s for s, _ in got_values] == [s for s, _ in want_values]
    worst = max(abs(g - w) / abs(w) for (_, g), (_, w) in zip(got_values, want_values, strict=True))
    assert worst <= rel, f"{key}: max relative difference {worst:.3e} > {rel:.1e}"


def start_training(nproc: int, run_dir: Path, data: Path, *overrides: str) -> subprocess.Popen:
    """Start the tiny config on `nproc` ranks in the background (its output goes to a log)."""
    config = ("--config", str(TINY), f"data.paths=[{data}]", f"train.run_dir={run_dir}")
    return start_script(nproc, run_dir, "-m", "scaletrain", "train", *config, *overrides)


def start_script(nproc: int, run_dir: Path, *args: str) -> subprocess.Popen:
    """`torchrun <args>` in the background, output to <run_dir>/launcher.log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = (run_dir / "launcher.log").open("a")
    command = torchrun_command(nproc, *args)
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=rank_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for_path(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended ({proc.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear in {timeout}s")
        time.sleep(0.05)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Block until metrics.jsonl holds `step` (fails if the run ends or stalls first)."""
    import time

    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and any(m["step"] >= step for m in _complete_lines(path)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended ({proc.returncode}) before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def _complete_lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line being written right now
            out.append(json.loads(line))
    return out


def rank_pids(proc: subprocess.Popen) -> list[int]:
    """The training ranks started by a torchrun process, ordered by pid."""
    import psutil

    return sorted(c.pid for c in psutil.Process(proc.pid).children() if "python" in c.name())


def launcher_log(run_dir: Path) -> str:
    return (run_dir / "launcher.log").read_text()


def printed_by_ranks(stderr: str, line: str) -> int:
    """How many ranks printed `line` under plain torchrun: the ranks share one pipe, so a line
    may run into another rank's output, and torchrun's own failure summary quotes it again
    after `traceback : ` (not counted)."""
    return len(re.findall(rf"(?<!traceback : ){re.escape(line)}", stderr))
