"""Run scaletrain on N CPU ranks (torchrun, gloo) and read back what rank 0 wrote.

Every run pins one intra-op thread per rank: with two threads, two identical runs already
differ in the last bits of the loss on these CPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "runs" / "tiny.yaml"


def rank_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def torchrun(nproc: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node nproc <args>`; fails the test with rank output."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *args,
    ]
    done = subprocess.run(
        command, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-60:])
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{tail}")
    return done


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def train(nproc: int, run_dir: Path, data: Path, *overrides: str) -> list[dict]:
    """Train the tiny config on `nproc` ranks; returns the per-step metrics."""
    torchrun(
        nproc,
        "-m",
        "scaletrain",
        "train",
        "--config",
        str(TINY),
        f"data.paths=[{data}]",
        f"train.run_dir={run_dir}",
        *overrides,
    )
    return read_metrics(run_dir)


def assert_losses_close(got: list[dict], want: list[dict], rel: float, key: str = "loss") -> None:
    """Same steps, and every value within `rel` relative difference (0 means bit-equal)."""
    got_values = [(m["step"], m[key]) for m in got if key in m]
    want_values = [(m["step"], m[key]) for m in want if key in m]
    assert [s for s, _ in got_values] == [s for s, _ in want_values]
    worst = max(abs(g - w) / abs(w) for (_, g), (_, w) in zip(got_values, want_values, strict=True))
    assert worst <= rel, f"{key}: max relative difference {worst:.3e} > {rel:.1e}"
