"""Step metrics: throughput, MFU, memory; written to metrics.jsonl, a rich line and wandb.

Only rank 0 writes. Every value is already reduced over the ranks that matter (the loss over
data-parallel ranks) before it gets here.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from scaletrain.config.schema import Config

METRICS_FILE = "metrics.jsonl"

# Dense bf16/fp16 tensor-core peaks (no sparsity), FLOP/s per GPU.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status")
    if status.exists():  # Linux: VmHWM, the high-water mark `reset_peak_memory` resets
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_memory(device: torch.device) -> None:
    """Start `peak_memory_bytes` over from what is in use now (e.g. before the next layout of
    `scaletrain scaletest`). On the CPU, Linux resets the resident-set high-water mark VmHWM
    through /proc/self/clear_refs; elsewhere the CPU peak stays monotonic."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    clear_refs = Path("/proc/self/clear_refs")
    if clear_refs.exists():
        clear_refs.write_text("5")


def device_peak_flops(device: torch.device, configured_tflops: float | None) -> float:
    """FLOP/s one device can do: configured, looked up by GPU name, or measured on the CPU."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), 312e12)
    return _measure_cpu_matmul_flops()


def _measure_cpu_matmul_flops(size: int = 512, seconds: float = 0.2) -> float:
    """Best fp32 matmul throughput of this process in a short burst (the CPU 'peak')."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


class MetricsWriter:
    """Rank 0's sink for per-step metrics."""

    def __init__(
        self,
        config: Config,
        run_dir: Path,
        total_steps: int,
        enabled: bool,
        resumed_step: int = 0,
    ) -> None:
        self.enabled = enabled
        self.interval = config.logging.interval
        self.total_steps = total_steps
        self.console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
        self.jsonl = None
        self.wandb_run = None
        self.start = time.perf_counter()
        self.first_step: int | None = None
        if not enabled:
            return
        if config.logging.jsonl:
            path = run_dir / METRICS_FILE
            _drop_steps_after(path, resumed_step)
            self.jsonl = path.open("a", buffering=1)
        if config.logging.wandb:
            self.wandb_run = _start_wandb(config, run_dir)

    def log_step(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps(metrics) + "\n")
        if self.wandb_run:
            self.wandb_run.log(metrics, step=metrics["step"])
        step = metrics["step"]
        if self.first_step is None:
            self.first_step, self.start = step, time.perf_counter()
        if step % self.interval == 0 or step == self.total_steps or "val_loss" in metrics:
            self.console.print(self._line(metrics))

    def _line(self, m: dict[str, Any]) -> str:
        done = m["step"] - (self.first_step or 0)
        per_step = (time.perf_counter() - self.start) / done if done else 0.0
        eta = per_step * (self.total_steps - m["step"])
        line = (
            f"step {m['step']:>5}/{self.total_steps}  loss {m['loss']:.4f}  lr {m['lr']:.2e}  "
            f"gnorm {m['grad_norm']:.3f}  {m['tokens_per_sec']:,.0f} tok/s  "
            f"MFU {100 * m['mfu']:.2f}%  mem {m['peak_mem_bytes'] / 2**30:.2f} GiB  "
            f"ETA {_duration(eta)}"
        )
        if "val_loss" in m:
            line += f"  [bold]val_loss {m['val_loss']:.4f}[/bold]"
        return line

    def summary(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
            self.jsonl = None
        if self.wandb_run:
            self.wandb_run.finish()
            self.wandb_run = None


def _drop_steps_after(path: Path, step: int) -> None:
    """A resumed run continues the curve: steps after the checkpoint are logged again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if _step(line) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line from a killed run: drop it


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else (f"{seconds // 60}m{seconds % 60:02d}s")
    )


def _start_wandb(config: Config, run_dir: Path) -> Any:
    import wandb

    from scaletrain.config.load import to_dict

    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return wandb.init(
        project=config.logging.wandb_project,
        dir=str(run_dir),
        config=to_dict(config),
        mode=mode,
        name=run_dir.name,
    )
