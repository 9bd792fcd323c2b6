"""For test scripts run under torchrun: a Trainer from `--config C [overrides]` on argv."""

from __future__ import annotations

import argparse
import os

from scaletrain.config import check_config, load_config
from scaletrain.logs import setup_logging
from scaletrain.topology.init import Topology, env_world_size, init_topology
from scaletrain.train.trainer import Trainer

# Test-only: a test sets this for its ranks to run fp16 on a CPU without oneDNN fp16 kernels.
LIFT_CPU_FP16_GATE = "SCALETRAIN_TEST_LIFT_CPU_FP16_GATE"


def lift_cpu_fp16_gate() -> None:
    """Let fp16 run on a CPU whose oneDNN lacks fp16 (no AVX512-FP16 / AMX-FP16).

    DeepSpeed's CPU accelerator, and our config check after it, refuse fp16 there: a capability
    gate (no fast kernels), not a correctness one, since torch computes fp16 on any CPU. The
    tests of loss scaling and overflow skipping lift it inside their ranks to run everywhere.
    """
    import torch
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    from scaletrain.config import precision

    precision.cpu_lacks_fp16 = lambda: False
    CPU_Accelerator.is_fp16_supported = lambda self: True
    CPU_Accelerator.supported_dtypes = lambda self: [torch.float, torch.bfloat16, torch.float16]


def trainer_from_argv(
    parser: argparse.ArgumentParser,
) -> tuple[argparse.Namespace, Trainer, Topology]:
    """Parse the script's own flags plus `--config` and overrides; build the ranks' Trainer."""
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    setup_logging()
    if os.environ.get(LIFT_CPU_FP16_GATE) == "1":
        lift_cpu_fp16_gate()
    config = load_config(args.config, args.overrides)
    resolved = check_config(config, env_world_size())
    topology = init_topology(resolved.dims)
    return args, Trainer(config, topology, resolved), topology
