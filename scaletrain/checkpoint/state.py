"""What a checkpoint holds besides DeepSpeed's files: where the loop and the data stand, each
rank's random generators, and how every parameter is split (so tools need no model code)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    """Everything a resume needs besides what DeepSpeed keeps (weights, optimizer, schedule,
    loss scale): where the loop and the data stand."""

    step: int
    consumed_samples: int
    consumed_tokens: int
    sampler: dict[str, Any]
    skipped_steps: int = 0
    lr_schedule: dict[str, Any] | None = None
    """Recorded for people and tools (DeepSpeed restores the schedule itself)."""
    loss_scale: float | None = None
    """fp16's dynamic loss scale, recorded likewise (DeepSpeed restores it)."""


def rng_state() -> dict[str, Any]:
    """This rank's random generators, as tensors and plain numbers (loadable weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def parameter_layout(module: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Per parameter: this rank's shape and how TP splits it (megatron-core's attributes).

    With this a checkpoint of any TP degree can be merged or re-split without the model code.
    """
    layout = {}
    for name, param in module.named_parameters():
        shape = getattr(param, "ds_shape", None) or param.shape  # ZeRO-3 keeps it aside
        split = getattr(param, "tensor_model_parallel", False)
        layout[name] = {
            "shape": list(shape),
            "tp_dim": int(param.partition_dim) if split else None,
            "tp_stride": int(getattr(param, "partition_stride", 1)) if split else None,
        }
    return layout
