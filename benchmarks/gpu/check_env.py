"""Before the GPU kit's runs: everything imports from the carried wheels, and DeepSpeed took its
CUDA accelerator. Prints the versions that matter, so that a failure later is read at once.

    python3 benchmarks/gpu/check_env.py
"""

from __future__ import annotations

import importlib.metadata as metadata

import datasets  # noqa: F401  (each must import from the carried wheels)
import deepspeed  # noqa: F401
import megatron.core  # noqa: F401
import torch
from deepspeed.accelerator import get_accelerator

import scaletrain  # noqa: F401

NAMES = [
    "torch",
    "deepspeed",
    "megatron-core",
    "datasets",
    "pydantic",
    "pyarrow",
    "fsspec",
    "huggingface-hub",
    "tokenizers",
    "typing-extensions",
    "packaging",
]


def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"


def main() -> None:
    print("versions:", ", ".join(f"{n} {version(n)}" for n in NAMES))
    print(f"cuda: {torch.cuda.is_available()}, {torch.cuda.device_count()} GPU(s)")
    accelerator = get_accelerator().device_name()
    if accelerator != "cuda":
        raise SystemExit(f"DeepSpeed picked the {accelerator!r} accelerator, not cuda")


if __name__ == "__main__":
    main()
