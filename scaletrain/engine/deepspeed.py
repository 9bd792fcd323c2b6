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
from scaletrain.engine.frozen_experts import engine_without_moe
from scaletrain.engine.moe_stages import join_expert_norm_reductions
from scaletrain.models.moe import check_expert_layout, create_expert_groups
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
    """Matrices decay; norm gains (1-D) do not. MoE expert weights go into groups of their
    own (DeepSpeed's MoE groups), which ZeRO shards and reduces over the expert-data-parallel
    ranks instead of all data-parallel ranks."""
    from deepspeed.moe.utils import (
        is_moe_param,
        split_params_into_different_moe_groups_for_optimizer,
    )

    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in params if _ndim(p) >= 2]
    vectors = [p for p in params if _ndim(p) < 2]
    groups = [
        {"name": "decay", "params": matrices, "weight_decay": weight_decay},
        {"name": "no_decay", "params": vectors, "weight_decay": 0.0},
    ]
    if any(is_moe_param(p) for p in params):
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def _ndim(param: torch.Tensor) -> int:
    shape = getattr(param, "ds_shape", None)  # ZeRO-3 keeps the real shape here
    return len(shape) if shape is not None else param.dim()


def initialize_engine(
    model: nn.Module,
    config: Config,
    resolved: Resolved,
    topology: Topology,
    load_universal: bool = False,
) -> tuple[Any, OwnClipping | None]:
    """deepspeed.initialize with our optimizer and schedule.

    Returns the engine (a PipelineEngine for a PipelineModule) and, for ZeRO-0 fp32, the
    `OwnClipping` that computes the gradient norm DeepSpeed leaves out there.
    """
    import deepspeed
    from deepspeed.pipe import PipelineModule

    o = config.optim
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        fused=topology.device.type == "cuda",
    )
    own = OwnClipping(optimizer, o.grad_clip) if clips_itself(config) else None
    scheduler: Callable = lambda opt: build_scheduler(opt, o, config.train.steps)  # noqa: E731
    pipelined = isinstance(model, PipelineModule)
    if config.model.num_experts:
        create_expert_groups(resolved.dims.ep, topology.mpu)
    with engine_without_moe(model):  # LoRA over frozen experts: nothing MoE to optimize
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config(config, resolved, load_universal),
            # A PipelineModule brings its own grid over the same rank layout as ours.
            mpu=None if pipelined else topology.mpu,
            dist_init_required=False,
        )
    if own is not None:
        own.engine = engine
    check_expert_layout(engine.module)
    if pipelined and config.model.num_experts:
        join_expert_norm_reductions(engine, topology.groups.pp, resolved.dims.ep, own is not None)
    return engine, own


def clips_itself(config: Config) -> bool:
    """ZeRO-0 in fp32: DeepSpeed clips there through a helper whose norm it drops, so we
    clip (and keep the norm) ourselves instead of computing the norm a second time."""
    return config.parallel.zero_stage == 0 and config.precision.dtype == "fp32"


class OwnClipping:
    """Gradient norm, clipping and the skip of non-finite steps for ZeRO-0 fp32.

    It runs as a pre-step hook of the torch optimizer, i.e. inside DeepSpeed's step, after the
    gradients are all-reduced, whether the step comes from `engine.step()` or from the
    pipeline schedule of `engine.train_batch()`. Elsewhere DeepSpeed does all of this itself.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
        self.max_norm = max_norm
        self.engine: Any = None
        self.norm: float | None = None
        self._schedule: dict[str, Any] | None = None  # set when the step is skipped
        optimizer.register_step_pre_hook(self._before_step)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.norm = norm_and_clip(self.engine, self.max_norm)
        if not math.isfinite(self.norm):
            for param in self.engine.module.parameters():
                param.grad = None  # torch's AdamW leaves parameters without a gradient alone
            self._schedule = self.engine.lr_scheduler.state_dict()

    def finish_step(self) -> float | None:
        """After the optimizer step: undo the schedule's advance of a skipped step (weights and
        Adam moments stayed put) and count it. Returns the step's gradient norm."""
        if self._schedule is not None:
            scheduler = self.engine.lr_scheduler
            scheduler.load_state_dict(self._schedule)
            for group, lr in zip(
                self.engine.optimizer.param_groups, scheduler.get_last_lr(), strict=True
            ):
                group["lr"] = lr
            self.engine.skipped_steps += 1
            self._schedule = None
        norm, self.norm = self.norm, None
        return norm


def norm_and_clip(engine: Any, max_norm: float) -> float:
    """Global gradient norm, then clip to `max_norm` (0: no clipping); ZeRO-0 fp32 only.

    Parameters that another rank of the model also holds are counted once, as megatron-core
    and DeepSpeed do: TP-replicated ones (norm gains) and a tied embedding's copy on the last
    pipeline stage. MoE experts differ between the ranks of an expert-parallel group, so their
    squares are summed over it too. The clip coefficient is torch's / DeepSpeed's.
    """
    import torch.distributed as dist
    from deepspeed.moe.utils import is_moe_param
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    params = [p for p in engine.module.parameters() if p.grad is not None]
    unique = [
        p
        for p in params
        if param_is_not_tensor_parallel_duplicate(p) and not getattr(p, "ds_pipe_replicated", False)
    ]
    squares = _squares([p.grad for p in unique if not is_moe_param(p)], engine.device)
    experts = [p for p in unique if is_moe_param(p)]
    if experts:  # every rank holds experts of the same (only) expert group
        expert_squares = _squares([p.grad for p in experts], engine.device)
        dist.all_reduce(expert_squares, group=engine.expert_parallel_group[experts[0].group_name])
        squares = squares + expert_squares
    dist.all_reduce(squares, group=engine.mpu.get_model_parallel_group())
    norm = squares.sqrt()
    if max_norm > 0:
        coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_([p.grad for p in params], coefficient)
    return norm.item()


def _squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), device=device)
    return torch.stack([g.float().pow(2).sum() for g in grads]).sum()
