"""torchrun command lines for one machine."""

from __future__ import annotations

import sys


def local_command(nproc: int, config: str, overrides: list[str]) -> list[str]:
    """`torchrun --standalone` with this interpreter, so the same venv runs every rank."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "scaletrain",
        "train",
        "--config",
        config,
        *overrides,
    ]
