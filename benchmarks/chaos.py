"""Chaos run: kill -9 one training run N times at seeded random moments, restart it each time
with the same command, and compare its loss curve with an uninterrupted run.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/chaos.py [--kills 20] [--seed S]
        [--nproc 2] [--zero-stage 1] [--dtype fp32] [--steps 150]

Each kill picks, from the seed, a victim (a random rank, or the `scaletrain launch local`
launcher, whose death turns into a stop request for torchrun) and a moment: during a training
step, in the window of an evaluation, or while a checkpoint is being written (its staging
folder exists). After each kill the script waits until every process of the run is gone, as a
scheduler would, then checks that no checkpoint was lost: every visible checkpoint still
verifies and the newest visible step did not go back. The run is then started again with the
same command; after the last kill it runs to the end. Last it prints

    survived K/N kills, curve identical: yes|no, checkpoints lost: L

where "curve identical" compares every step's loss and validation loss (the last record of
each step in metrics.jsonl: steps after a checkpoint are trained and logged again on resume)
bit for bit with the uninterrupted run. Runs are deterministic (`train.deterministic`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "runs" / "chaos"
MOMENTS = ("step", "eval", "save")
EVAL_INTERVAL = 5
CHECKPOINT_INTERVAL = 3


@dataclass
class Kill:
    victim: str  # "launcher" or "rank N"
    moment: str
    step: int  # the newest logged step when the kill was sent
    exit_code: int | None
    resumed_ok: bool | None = None
    """Whether the next start trained on; None until it is known."""


def rank_env() -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def prepare_data() -> Path:
    """A small real data set (40 standard-library files, a 512-token BPE), made once."""
    out = WORK / "data"
    if not (out / "metadata.json").is_file():
        from scaletrain.data import prepare_dataset, stdlib_sources

        prepare_dataset(stdlib_sources()[:40], out, vocab_size=512, val_fraction=0.1, num_proc=1)
    return out


def command(args: argparse.Namespace, run_dir: Path, data: Path) -> list[str]:
    overrides = [
        f"data.paths=[{data}]",
        f"train.run_dir={run_dir}",
        f"train.steps={args.steps}",
        f"train.eval_interval={EVAL_INTERVAL}",
        f"checkpoint.interval={CHECKPOINT_INTERVAL}",
        f"parallel.zero_stage={args.zero_stage}",
        f"precision.dtype={args.dtype}",
        "train.deterministic=true",
        "fault.collective_timeout_minutes=2",
    ]
    config = str(REPO / "configs" / "runs" / "tiny.yaml")
    launch = [sys.executable, "-m", "scaletrain", "launch", "local", f"--nproc={args.nproc}"]
    return [*launch, "--config", config, *overrides]


def start(cmd: list[str], run_dir: Path) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    log = (run_dir / "chaos.log").open("a")
    return subprocess.Popen(cmd, cwd=REPO, env=rank_env(), stdout=log, stderr=subprocess.STDOUT)


def logged_steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # the line being written
            records.append(json.loads(line))
    return records


def newest_step(run_dir: Path) -> int:
    records = logged_steps(run_dir)
    return records[-1]["step"] if records else 0


def curve(run_dir: Path) -> dict[int, tuple[float, float | None]]:
    """The last record of each step: a resumed run logs the steps after its checkpoint again."""
    return {m["step"]: (m["loss"], m.get("val_loss")) for m in logged_steps(run_dir)}


def ranks_of(launcher: subprocess.Popen) -> list[psutil.Process]:
    """The training ranks: the python children of torchrun, the launcher's child."""
    try:
        found = psutil.Process(launcher.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return sorted(
        (p for p in found if _is_rank(p)), key=lambda p: int(_environ(p).get("RANK", "0"))
    )


def _environ(process: psutil.Process) -> dict[str, str]:
    try:
        return process.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return {}


def _is_rank(process: psutil.Process) -> bool:
    return "LOCAL_RANK" in _environ(process)


def wait_for(condition, launcher: subprocess.Popen, timeout: float = 300) -> bool:
    """Poll `condition` every 2 ms; False if the run ended or the time ran out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if launcher.poll() is not None:
            return False
        time.sleep(0.002)
    return False


def aim(moment: str, run_dir: Path, launcher: subprocess.Popen, rng: random.Random) -> bool:
    """Wait for the chosen moment of the running job; False if it ended before it came."""
    staging = run_dir / "checkpoints" / ".staging"
    start_step = newest_step(run_dir)
    # The ranks are up and training once a step is logged after this start.
    if not wait_for(lambda: newest_step(run_dir) > start_step, launcher):
        return False
    if moment == "step":
        target = newest_step(run_dir) + rng.randint(0, 2 * CHECKPOINT_INTERVAL)
        if not wait_for(lambda: newest_step(run_dir) >= target, launcher):
            return False
        time.sleep(rng.uniform(0.0, 0.05))
        return launcher.poll() is None
    if moment == "eval":  # evaluation runs after step e's update, before step e is logged
        now = newest_step(run_dir)
        before_eval = (now // EVAL_INTERVAL + 1) * EVAL_INTERVAL - 1
        if not wait_for(lambda: newest_step(run_dir) >= before_eval, launcher):
            return False
        time.sleep(rng.uniform(0.02, 0.12))
        return launcher.poll() is None
    return wait_for(lambda: staging.is_dir() and any(staging.glob("step_*/*")), launcher)


def kill(victim: str, launcher: subprocess.Popen) -> bool:
    if victim == "launcher":
        launcher.send_signal(signal.SIGKILL)
        return True
    wanted = int(victim.split()[1])
    for rank in ranks_of(launcher):
        if int(_environ(rank).get("RANK", "-1")) == wanted:
            rank.send_signal(signal.SIGKILL)
            return True
    return False


def wait_until_gone(launcher: subprocess.Popen, family: list[psutil.Process]) -> int | None:
    """Wait for the launcher and every process it started; kill -9 leftovers after 180 s, as
    a scheduler ending a job would."""
    try:
        code = launcher.wait(timeout=180)
    except subprocess.TimeoutExpired:
        code = None
    _, alive = psutil.wait_procs(family, timeout=180)
    for process in alive:
        process.kill()
    return code


def checkpoints_lost(run_dir: Path, newest_before: int | None) -> int:
    """Visible checkpoints that no longer verify, plus one if the newest went back."""
    from scaletrain.checkpoint import tools

    root = run_dir / "checkpoints"
    if not root.is_dir():
        return 0
    listing = tools.list_run(root)
    lost = len(listing.corrupt)
    good = [e.step for e in listing.entries if e.visible and not e.corrupt and e.step is not None]
    newest = max(good, default=None)
    if newest_before is not None and (newest is None or newest < newest_before):
        lost += 1
    return lost


def newest_checkpoint(run_dir: Path) -> int | None:
    from scaletrain.checkpoint.manifest import list_checkpoints, step_of

    found = list_checkpoints(run_dir / "checkpoints")
    return step_of(found[-1]) if found else None


def chaos(args: argparse.Namespace, data: Path) -> tuple[list[Kill], int, Path]:
    """Kill the run `args.kills` times, restarting it after each; then let it finish."""
    run_dir = WORK / f"killed-{args.dtype}-z{args.zero_stage}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = command(args, run_dir, data)
    rng = random.Random(args.seed)
    kills: list[Kill] = []
    lost = failed_starts = 0
    while len(kills) < args.kills and failed_starts < 3:
        launcher = start(cmd, run_dir)
        victim = rng.choice(["launcher"] + [f"rank {r}" for r in range(args.nproc)])
        moment = rng.choice(MOMENTS)
        if not aim(moment, run_dir, launcher, rng):  # it ended by itself before the moment
            code = launcher.wait()
            if code == 0:
                print(f"the run finished after {len(kills)} kills: give it more --steps")
                break
            failed_starts += 1
            if kills:
                kills[-1].resumed_ok = False
            print(f"a restart failed on its own (exit {code}): see {run_dir / 'chaos.log'}")
            continue
        if kills and kills[-1].resumed_ok is None:  # this start trained: the kill is survived
            kills[-1].resumed_ok = True
        failed_starts = 0
        family = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(True)]
        newest_before = newest_checkpoint(run_dir)
        step = newest_step(run_dir)
        if not kill(victim, launcher):
            wait_until_gone(launcher, family)
            continue
        code = wait_until_gone(launcher, family)
        kills.append(Kill(victim, moment, step, code, resumed_ok=None))
        lost_now = checkpoints_lost(run_dir, newest_before)
        lost += lost_now
        print(
            f"kill {len(kills):2d}: {victim:8s} during {moment:4s} after step {step:3d}, "
            f"exit {code}, newest checkpoint {newest_checkpoint(run_dir)}, lost {lost_now}",
            flush=True,
        )
    final = subprocess.run(cmd, cwd=REPO, env=rank_env(), capture_output=True, text=True)
    if kills and kills[-1].resumed_ok is None:
        kills[-1].resumed_ok = final.returncode == 0
    if final.returncode != 0:
        print(f"the last start failed (exit {final.returncode}):\n{final.stderr[-2000:]}")
    return kills, lost, run_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    data = prepare_data()

    reference = WORK / f"reference-{args.dtype}-z{args.zero_stage}"
    shutil.rmtree(reference, ignore_errors=True)
    done = subprocess.run(
        command(args, reference, data), cwd=REPO, env=rank_env(), capture_output=True, text=True
    )
    if done.returncode != 0:
        print(f"the uninterrupted run failed ({done.returncode})")
        return 1

    kills, lost, run_dir = chaos(args, data)
    survived = sum(k.resumed_ok is True for k in kills)
    want, got = curve(reference), curve(run_dir)
    identical = want == got and len(want) == args.steps
    if not identical:
        differing = [s for s in sorted(want) if got.get(s) != want[s]]
        print(f"steps that differ: {differing[:10]} (of {len(want)})")
    print(
        f"survived {survived}/{len(kills)} kills, curve identical: {'yes' if identical else 'no'}, "
        f"checkpoints lost: {lost}"
    )
    return 0 if identical and lost == 0 and survived == len(kills) else 1


if __name__ == "__main__":
    sys.exit(main())
