"""`scaletrain plan --search`: every valid layout of N devices, ranked by predicted tokens/s.

The layouts are `scaletest`'s (`scaletest/layouts.candidates`: tp * pp * dp = N, ep dividing dp
for MoE models, ZeRO 0-3), crossed with micro-batch sizes and recompute modes, and each one is
kept only if `check_config` accepts it, exactly as `scaletest` filters. The global batch stays
the config's own, so every candidate trains the same thing and only the speed differs.
"""

from __future__ import annotations

import dataclasses

from scaletrain.config.checks import Resolved, check_config
from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError
from scaletrain.plan.hardware import Hardware
from scaletrain.plan.planner import Plan, make_plan
from scaletrain.scaletest.layouts import Layout, candidates

MICRO_BATCHES = (1, 2, 4, 8, 16)
RECOMPUTE = ("none", "every_n", "full")


def _variant(config: Config, layout: Layout, micro: int, recompute: str) -> Config:
    """A shallow copy with another layout, micro-batch and recompute mode (deepcopy per
    candidate would cost seconds at N = 16,384)."""
    p = dataclasses.replace(
        config.parallel,
        tp=layout.tp,
        pp=layout.pp,
        dp=layout.dp,
        ep=layout.ep,
        zero_stage=layout.zero,
    )
    t = dataclasses.replace(config.train, micro_batch=micro, grad_accum=None)
    m = dataclasses.replace(config.model, activation_checkpointing=recompute)
    return dataclasses.replace(config, parallel=p, train=t, model=m)


def search(
    config: Config, resolved: Resolved, world_size: int, hw: Hardware
) -> tuple[list[Plan], int, int]:
    """(fitting plans best first, candidates checked, candidates check_config refused)."""
    base = dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, vocab_size=resolved.vocab_size),
        train=dataclasses.replace(config.train, global_batch=resolved.global_batch),
    )
    fitting, checked, refused = [], 0, 0
    layouts = candidates(world_size, config.model.num_experts, config.parallel.zero_stage)
    for layout in layouts:
        if resolved.global_batch % layout.dp:
            refused += len(MICRO_BATCHES) * len(RECOMPUTE)
            checked += len(MICRO_BATCHES) * len(RECOMPUTE)
            continue
        for micro in MICRO_BATCHES:
            for recompute in RECOMPUTE:
                checked += 1
                variant = _variant(base, layout, micro, recompute)
                try:
                    # The data was read once above: vocab_size is now in the config.
                    found = check_config(variant, world_size, check_data=False)
                except ConfigError:
                    refused += 1
                    continue
                plan = make_plan(variant, found, hw)
                if plan.fits:
                    fitting.append(plan)
    fitting.sort(key=lambda p: -p.tokens_per_sec)
    return fitting, checked, refused


def why_better(best: Plan, own: Plan) -> str:
    """One line: why the best candidate beats the config's own layout."""
    if not own.fits:
        return (
            f"the config's own layout does not fit ({own.largest.total_bytes / 1e9:.1f} GB > "
            f"{own.hardware.memory_bytes / 1e9:.1f} GB on stage {own.largest.stage})"
        )
    gains = {key: own_value - best.time.terms()[key] for key, own_value in own.time.terms().items()}
    key = max(gains, key=gains.get)
    speedup = best.tokens_per_sec / own.tokens_per_sec
    if speedup <= 1.0 + 1e-9:
        return "the config's own layout is already the fastest that fits"
    return (
        f"{speedup:.2f}x the tokens/s of the config's own layout, mostly from "
        f"{key[:-2]}: {own.time.terms()[key]:.4g} s -> {best.time.terms()[key]:.4g} s per step"
    )
