"""DeepSpeed engine from our config: ZeRO stage, precision, clipping, accumulation, AdamW.

The ds_config is derived, never written by hand, so that it cannot disagree with the checks
in `scaletrain.config.checks`. ZeRO-3 models must be built inside `model_init_context`, which
partitions each parameter over the data-parallel group as soon as it is created.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from scaletrain.config.checks import Resolved
from scaletrain.config.schema import Config
from scaletrain.plan.flops import parameter_count
from scaletrain.topology.init import Topology
from scaletrain.train.schedule import build_scheduler

NEVER = 1 << 62  # steps_per_print: our own metrics do the printing
DEFAULT_BUCKET = 500_000_000  # DeepSpeed's own default bucket, in elements


def bucket_size(config: Config, resolved: Resolved) -> int:
    """ZeRO communication buckets: DeepSpeed's default, but never larger than the model.

    DeepSpeed allocates and scans whole buckets; a 5e8-element bucket around a small model
    costs gigabytes and makes a ZeRO-1 step on the CPU ~20x slower than ZeRO-0.
    """
    params = parameter_count(config.model, resolved.padded_vocab_size)
    return min(DEFAULT_BUCKET, max(params, 1_000_000))


def ds_config(config: Config, resolved: Resolved, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run; `load_universal` when it resumes from a
    checkpoint of another layout (converted by `scaletrain.checkpoint.convert`)."""
    p = config.precision
    return {
        "train_batch_size": resolved.global_batch,
        "train_micro_batch_size_per_gpu": resolved.micro_batch,
        "gradient_accumulation_steps": resolved.grad_accum,
        "gradient_clipping": 0.0 if clips_itself(config) else config.optim.grad_clip,
        "zero_optimization": {
            "stage": config.parallel.zero_stage,
            "reduce_bucket_size": bucket_size(config, resolved),
            "allgather_bucket_size": bucket_size(config, resolved),
        },
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": p.dtype == "bf16"},
        "fp16": {
            "enabled": p.dtype == "fp16",
            "loss_scale": p.loss_scale,
            "initial_scale_power": p.initial_scale_power,
            "loss_scale_window": p.loss_scale_window,
            "hysteresis": p.hysteresis,
            "min_loss_scale": p.min_loss_scale,
        },
        "steps_per_print": NEVER,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }


def model_init_context(config: Config, resolved: Resolved, topology: Topology):
    """Where to build the model: ZeRO-3 partitions parameters at creation, others need nothing."""
    if config.parallel.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.Init(
        config_dict_or_path=ds_config(config, resolved),
        mpu=topology.mpu,
        # Without this zero.Init partitions over (and broadcasts from rank 0 of) the whole
        # world, which overwrites every TP rank's slice with TP rank 0's.
        data_parallel_group=topology.groups.dp,
        remote_device="cpu" if topology.device.type == "cpu" else None,
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Matrices decay; norm gains (1-D) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in params if _ndim(p) >= 2]
    vectors = [p for p in params if _ndim(p) < 2]
    return [
        {"params": matrices, "weight_decay": weight_decay},
        {"params": vectors, "weight_decay": 0.0},
    ]


def _ndim(param: torch.Tensor) -> int:
    shape = getattr(param, "ds_shape", None)  # ZeRO-3 keeps the real shape here
    return len(shape) if shape is not None else param.dim()


def initialize_engine(
    model: nn.Module,
    config: Config,
    resolved: Resolved,
    topology: Topology,
    load_universal: bool = False,
) -> Any:
    """deepspeed.initialize with our optimizer and schedule; returns the engine."""
    import deepspeed

    o = config.optim
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        fused=topology.device.type == "cuda",
    )
    scheduler: Callable = lambda opt: build_scheduler(opt, o, config.train.steps)  # noqa: E731
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config(config, resolved, load_universal),
        mpu=topology.mpu,
        dist_init_required=False,
    )
    return engine


def step(engine: Any, clip_ourselves: bool, max_norm: float) -> float | None:
    """engine.step(), plus what DeepSpeed leaves out for ZeRO-0 fp32 (`clips_itself`): the
    gradient norm, clipping, and skipping a step whose gradients are not finite.

    Elsewhere DeepSpeed's own overflow check skips non-finite steps (and does not advance the
    schedule); returns the norm when we computed it, else None.
    """
    if not (clip_ourselves and engine.is_gradient_accumulation_boundary()):
        engine.step()
        return None
    norm = norm_and_clip(engine, max_norm)
    if math.isfinite(norm):
        engine.step()
    else:
        _skip_update(engine)
    return norm


def _skip_update(engine: Any) -> None:
    """Let DeepSpeed count the step while weights, Adam moments and the schedule stay put."""
    for param in engine.module.parameters():
        param.grad = None  # torch's AdamW leaves parameters without a gradient untouched
    scheduler = engine.lr_scheduler
    schedule = scheduler.state_dict()
    engine.step()
    scheduler.load_state_dict(schedule)
    for group, lr in zip(engine.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    engine.skipped_steps += 1


def clips_itself(config: Config) -> bool:
    """ZeRO-0 in fp32: DeepSpeed clips there through a helper whose norm it drops, so we
    clip (and keep the norm) ourselves instead of computing the norm a second time."""
    return config.parallel.zero_stage == 0 and config.precision.dtype == "fp32"


def norm_and_clip(engine: Any, max_norm: float) -> float:
    """Global gradient norm, then clip to `max_norm` (0: no clipping); ZeRO-0 fp32 only.

    Call after the last backward of a step. TP-replicated parameters (norm gains) are counted
    once, as megatron-core does; the clip coefficient is torch's / DeepSpeed's.
    """
    import torch.distributed as dist
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    unique = [
        p.grad
        for p in engine.module.parameters()
        if p.grad is not None and param_is_not_tensor_parallel_duplicate(p)
    ]
    squares = torch.stack([g.float().pow(2).sum() for g in unique]).sum()
    dist.all_reduce(squares, group=engine.mpu.get_model_parallel_group())
    norm = squares.sqrt()
    if max_norm > 0:
        coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coefficient)
    return norm.item()
