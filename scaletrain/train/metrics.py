"""Step metrics: throughput, MFU and memory, and the writer that hands them to the sinks.

Only rank 0 writes. Every value is already reduced over the ranks that matter (the loss over
data-parallel ranks) before it gets here. The sinks themselves are in `sinks.py` and
`console.py`.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from scaletrain.config.schema import Config
from scaletrain.train.console import ConsoleSink
from scaletrain.train.sinks import (
    METRICS_FILE,
    JsonlSink,
    MetricsSink,
    TensorBoardSink,
    WandbSink,
)

__all__ = ["METRICS_FILE", "MetricsWriter", "device_peak_flops", "peak_memory_bytes"]


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


def device_peak_flops(device: torch.device, configured_tflops: float | None, dtype: str) -> float:
    """FLOP/s one device can do in `dtype`: configured, the `configs/hardware.yaml` entry of
    this GPU (its fp32 peak for an fp32 run), or measured (the CPU, or a GPU not listed)."""
    from scaletrain.plan.hardware import hardware_for_device, load_hardware, measure_cpu_tflops

    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        entry = hardware_for_device(torch.cuda.get_device_name(device))
        if entry is not None:
            return load_hardware(entry).peak_for(dtype)
        return _measure_gpu_matmul_flops(device, dtype)
    return measure_cpu_tflops(threads=None) * 1e12  # the rank's own threads, as it trains


def _measure_gpu_matmul_flops(device: torch.device, dtype: str, size: int = 8192) -> float:
    """The best of a few large matmuls in the run's dtype: a GPU that hardware.yaml lacks."""
    kind = {"fp32": torch.float32, "fp16": torch.float16}.get(dtype, torch.bfloat16)
    a = torch.randn(size, size, device=device, dtype=kind)
    b = torch.randn(size, size, device=device, dtype=kind)
    best = 0.0
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        torch.cuda.synchronize(device)
        best = max(best, 2 * size**3 / (start.elapsed_time(end) / 1e3))
    return best


class MetricsWriter:
    """Rank 0's fan-out of per-step metrics to every configured sink (console, metrics.jsonl,
    TensorBoard, wandb); other ranks hold a disabled writer."""

    def __init__(
        self,
        config: Config,
        run_dir: Path,
        total_steps: int,
        enabled: bool,
        resumed_step: int = 0,
        console: Console | None = None,
    ) -> None:
        self.enabled = enabled
        self.console = ConsoleSink(total_steps, config.logging.interval, console)
        self.sinks: list[MetricsSink] = []
        if not enabled:
            return
        self.sinks.append(self.console)
        if config.logging.jsonl:
            self.sinks.append(JsonlSink(run_dir, resumed_step))
        if config.logging.tensorboard:
            self.sinks.append(TensorBoardSink(run_dir))
        if config.logging.wandb:
            self.sinks.append(WandbSink(config, run_dir))

    def log_step(self, metrics: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(metrics)

    def summary(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()
