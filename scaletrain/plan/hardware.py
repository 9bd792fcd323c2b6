"""The device table of `configs/hardware.yaml`, and the one entry measured on the spot (`cpu`).

Every number the time and memory models use about a device comes from here, so a user who
knows better (a different NIC, a measured efficiency) edits one file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from scaletrain.errors import ConfigError
from scaletrain.resources import HARDWARE_FILE

MEASURED = "measured"
_FIELDS = (
    "peak_tflops",
    "fp32_tflops",
    "efficiency",
    "memory_gb",
    "intra_node_gbs",
    "inter_node_gbs",
    "comm_efficiency",
    "latency_us",
    "overhead_gb",
    "attention",
    "gpus_per_node",
)


@dataclass(frozen=True)
class Hardware:
    """One device kind, in SI units (FLOP/s, bytes, bytes/s, seconds)."""

    name: str
    peak_flops: float
    """bf16/fp16 dense peak."""
    fp32_flops: float
    efficiency: float
    memory_bytes: float
    intra_node_bw: float
    inter_node_bw: float
    comm_efficiency: float
    latency_s: float
    overhead_bytes: float
    attention: str
    gpus_per_node: int
    """Ranks per node; 0 means every rank on one machine (the CPU)."""

    def peak_for(self, dtype: str) -> float:
        """The peak a run in `dtype` can reach (fp32 runs do not use bf16 tensor cores)."""
        return self.fp32_flops if dtype == "fp32" else self.peak_flops

    def ranks_per_node(self, world_size: int) -> int:
        return self.gpus_per_node or world_size


def hardware_names(path: Path = HARDWARE_FILE) -> list[str]:
    return list(_read(path))


def hardware_for_device(device_name: str, path: Path = HARDWARE_FILE) -> str | None:
    """The entry of a GPU as CUDA names it ("NVIDIA H100 80GB HBM3" -> H100-SXM): the entry
    whose model (its name up to the first '-') appears in the device name; None if none does."""
    words = device_name.upper().replace("-", " ").split()
    entries = [name for name in _read(path) if name != "cpu"]
    found = [name for name in entries if name.split("-")[0].upper() in words]
    return max(found, key=len) if found else None


def load_hardware(
    name: str, world_size: int = 1, gpus_per_node: int | None = None, path: Path = HARDWARE_FILE
) -> Hardware:
    """The entry `name`; `measured` fields are measured now (only the cpu entry has them)."""
    table = _read(path)
    if name not in table:
        raise ConfigError("--gpu", f"{name!r} is not in {path.name}; known: {', '.join(table)}")
    raw = table[name]
    missing = [f for f in _FIELDS if f not in raw]
    if missing:
        raise ConfigError("--gpu", f"{path.name} entry {name!r} lacks {', '.join(missing)}")
    peak = raw["peak_tflops"]
    fp32 = raw["fp32_tflops"]
    memory = raw["memory_gb"]
    if MEASURED in (peak, fp32):
        peak = fp32 = measure_cpu_tflops()
    if memory == MEASURED:
        memory = _mem_total_gb() / max(world_size, 1)
    if raw["attention"] not in ("flash", "math"):
        raise ConfigError("--gpu", f"{path.name} entry {name!r}: attention must be flash or math")
    return Hardware(
        name=name,
        peak_flops=float(peak) * 1e12,
        fp32_flops=float(fp32) * 1e12,
        efficiency=float(raw["efficiency"]),
        memory_bytes=float(memory) * 1e9,
        intra_node_bw=float(raw["intra_node_gbs"]) * 1e9,
        inter_node_bw=float(raw["inter_node_gbs"]) * 1e9,
        comm_efficiency=float(raw["comm_efficiency"]),
        latency_s=float(raw["latency_us"]) * 1e-6,
        overhead_bytes=float(raw["overhead_gb"]) * 1e9,
        attention=raw["attention"],
        gpus_per_node=int(gpus_per_node if gpus_per_node is not None else raw["gpus_per_node"]),
    )


def _read(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ConfigError("--gpu", f"{path} must hold a mapping of device names")
    return data


def measure_cpu_tflops(threads: int | None = 1, size: int = 512, seconds: float = 0.2) -> float:
    """The best fp32 matmul rate in a short burst, on `threads` threads (None: the process's
    own count). The planner asks for one: the ranks here run one thread each."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(before)
    return best / 1e12


def _mem_total_gb() -> float:
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / 1e9
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
