"""`scaletrain launch status RUN_DIR`: the run's SLURM jobs, their state and restarts, and how
far training got.

Job states come from `scontrol show job` (works without SLURM accounting; the one-machine
cluster keeps finished jobs for a day, `MinJobAge`). A job SLURM has forgotten is described
from the lines the batch script wrote into its log ("scaletrain: job N start/end ...").
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from scaletrain.checkpoint.manifest import read_latest
from scaletrain.errors import ScaletrainError
from scaletrain.launch.slurm import JOBS, SLURM_DIR

_FIELD = re.compile(r"(\w+)=(\S*)")


@dataclass
class JobStatus:
    """One submitted job as SLURM (or its log) describes it."""

    job_id: str
    state: str
    restarts: int
    elapsed: str
    exit_code: str
    reason: str
    log: str


def scontrol_job(job_id: str) -> dict[str, str] | None:
    """`scontrol show job -o` as a dict, or None when SLURM does not know the job (any more)."""
    if shutil.which("scontrol") is None:
        return None
    done = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
    )
    if done.returncode != 0 or not done.stdout.strip():
        return None
    return dict(_FIELD.findall(done.stdout))


def _from_log(job_id: str, log: Path) -> tuple[str, int, str]:
    """(state, restarts, exit) from the batch script's own lines, for a forgotten job."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    mine = [line for line in lines if line.startswith(f"scaletrain: job {job_id} ")]
    starts = sum(" start: " in line for line in mine)
    ends = [line for line in mine if " end: exit " in line]
    if not mine:
        return "UNKNOWN (no log)", 0, "-"
    if ends:
        code = ends[-1].split(" end: exit ", 1)[1].split()[0]
        return ("FINISHED" if code == "0" else "ENDED"), max(starts - 1, 0), code
    return "UNKNOWN (log ends without an end line)", max(starts - 1, 0), "-"


def job_status(record: dict) -> JobStatus:
    job_id, log = record["job_id"], Path(record["log"])
    info = scontrol_job(job_id)
    if info is None:
        state, restarts, code = _from_log(job_id, log)
        return JobStatus(job_id, state, restarts, "-", code, "not known to SLURM", str(log))
    return JobStatus(
        job_id=job_id,
        state=info.get("JobState", "?"),
        restarts=int(info.get("Restarts", "0") or 0),
        elapsed=info.get("RunTime", "-"),
        exit_code=info.get("ExitCode", "-"),
        reason=info.get("Reason", "-") if info.get("Reason") != "None" else "-",
        log=str(log),
    )


def run_status(run_dir: Path) -> list[str]:
    """The lines `launch status` prints."""
    jobs_file = run_dir / SLURM_DIR / JOBS
    if not jobs_file.is_file():
        raise ScaletrainError(
            f"no SLURM jobs recorded for {run_dir} ({jobs_file} is missing); "
            "submit with scaletrain launch slurm --submit"
        )
    records = [json.loads(line) for line in jobs_file.read_text().splitlines() if line.strip()]
    statuses = [job_status(r) for r in records]
    rows = [("job", "state", "restarts", "elapsed", "exit", "reason")]
    rows += [
        (s.job_id, s.state, str(s.restarts), s.elapsed, s.exit_code, s.reason) for s in statuses
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.append(_progress(run_dir))
    if statuses:
        lines.append(f"log: {statuses[-1].log}")
    return lines


def _progress(run_dir: Path) -> str:
    """Last step, loss and validation loss from metrics.jsonl; the newest checkpoint."""
    metrics = run_dir / "metrics.jsonl"
    steps_total = _configured_steps(run_dir)
    rows = []
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line being written right now
                continue
    ckpt = read_latest(run_dir / "checkpoints") or "none"
    if not rows:
        return f"progress: no steps logged yet ({metrics}); checkpoint {ckpt}"
    last = rows[-1]
    vals = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    val = f", last val_loss {vals[-1]:.4f}" if vals else ""
    of = f"/{steps_total}" if steps_total else ""
    return f"progress: step {last['step']}{of}, loss {last['loss']:.4f}{val}; checkpoint {ckpt}"


def _configured_steps(run_dir: Path) -> int | None:
    from scaletrain.config import load_config

    resolved = run_dir / SLURM_DIR / "config.yaml"
    if not resolved.is_file():
        return None
    return load_config(resolved).train.steps
