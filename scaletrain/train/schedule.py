"""Learning-rate schedule: linear warmup to optim.lr, then cosine decay to optim.min_lr.

A LambdaLR rather than DeepSpeed's WarmupCosineLR, which needs >= 2 warmup steps and spends the
first step at lr = 0. Step s (0-based) of warmup uses lr * (s + 1) / warmup_steps, as Megatron.
"""

from __future__ import annotations

import math

import torch

from scaletrain.config.schema import OptimConfig


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    decay_steps = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr + (optim.lr - optim.min_lr) * cosine


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, optim, total_steps) / optim.lr
    )


def reapply_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, optim: OptimConfig) -> None:
    """After a resume: this config's learning rate at the resumed step.

    DeepSpeed restores the optimizer's rates and the scheduler's base rates as saved, so a
    changed schedule (train.steps, optim.lr, ...) would start from the old one. Computed as
    LambdaLR computes it, so an unchanged schedule keeps every bit. One rate per group of this
    rank's optimizer: a resharded pipeline restores the scheduler of stage 0, whose MoE blocks
    may give it more groups than a stage without them has."""
    scheduler.base_lrs = [optim.lr for _ in scheduler.optimizer.param_groups]
    rates = [
        base * rule(scheduler.last_epoch)
        for base, rule in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["initial_lr"], group["lr"] = optim.lr, rate
    scheduler._last_lr = rates
