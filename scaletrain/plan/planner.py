"""One plan: a config's layout on N devices, its per-stage memory and its step time.

`make_plan` joins the memory model (`memory.py`) and the time model (`timing.py`) for a config
that `check_config` has accepted; `plan_json` and `format_plan` are what `scaletrain plan`
prints. No process group, no model, no DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scaletrain.config.checks import Resolved
from scaletrain.config.schema import Config
from scaletrain.plan import memory
from scaletrain.plan.flops import flops_per_token, parameter_count
from scaletrain.plan.hardware import Hardware
from scaletrain.plan.timing import StepTime, step_time


@dataclass(frozen=True)
class Plan:
    config: Config
    resolved: Resolved
    hardware: Hardware
    stages: list[memory.StageMemory]
    time: StepTime
    flops_per_step: float

    @property
    def largest(self) -> memory.StageMemory:
        return max(self.stages, key=lambda s: s.total_bytes)

    @property
    def fits(self) -> bool:
        return self.largest.total_bytes <= self.hardware.memory_bytes

    @property
    def margin_bytes(self) -> float:
        return self.hardware.memory_bytes - self.largest.total_bytes

    @property
    def tokens_per_step(self) -> int:
        return self.resolved.global_batch * self.config.train.seq_len

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens_per_step / self.time.step_time_s

    @property
    def mfu(self) -> float:
        peak = self.hardware.peak_for(self.config.precision.dtype)
        return self.flops_per_step / (self.time.step_time_s * self.resolved.dims.world_size * peak)


def make_plan(config: Config, resolved: Resolved, hw: Hardware) -> Plan:
    dims = resolved.dims
    params = memory.stage_params(config, resolved)
    ranges = memory.stage_blocks(config, resolved.padded_vocab_size, dims.pp)
    rows = []
    dtype, zero = config.precision.dtype, config.parallel.zero_stage
    for s, (p, blocks) in enumerate(zip(params, ranges, strict=True)):
        dense = memory.model_states(p.dense, dtype, zero, dims.dp)
        expert = memory.model_states(p.expert, dtype, zero, dims.dp // dims.ep)
        flight = memory.in_flight(dims.pp, s, resolved.grad_accum)
        micro = resolved.micro_batch
        act = memory.activation_bytes(config, resolved, blocks, micro, hw.attention, flight)
        logits = memory.logits_bytes(config, resolved, resolved.micro_batch) if p.last else 0.0
        rows.append(
            memory.StageMemory(
                stage=s,
                params_bytes=dense[0] + expert[0],
                grads_bytes=dense[1] + expert[1],
                optimizer_bytes=dense[2] + expert[2],
                activation_bytes=act,
                logits_bytes=logits,
                buffer_bytes=memory.buffer_bytes(config, resolved, p, act + logits),
                overhead_bytes=hw.overhead_bytes,
                in_flight=flight,
            )
        )
    slowest = max(range(dims.pp), key=lambda s: len(ranges[s]))
    time = step_time(config, resolved, hw, params[slowest], len(ranges[slowest]))
    per_token = flops_per_token(config.model, config.train.seq_len, resolved.padded_vocab_size)
    flops = per_token * resolved.global_batch * config.train.seq_len
    return Plan(config, resolved, hw, rows, time, flops)


def plan_json(plan: Plan, tokens: float | None = None) -> dict[str, Any]:
    """The `--json` object (keys are public interface, see issue 11)."""
    c, r = plan.config, plan.resolved
    m = c.model
    out: dict[str, Any] = {
        "world_size": r.dims.world_size,
        "gpu": plan.hardware.name,
        "layout": {
            "tp": r.dims.tp,
            "pp": r.dims.pp,
            "dp": r.dims.dp,
            "ep": r.dims.ep,
            "zero_stage": c.parallel.zero_stage,
            "micro_batch": r.micro_batch,
            "grad_accum": r.grad_accum,
            "activation_checkpointing": m.activation_checkpointing,
        },
        "parameters": {
            "total": parameter_count(m, r.padded_vocab_size),
            "active": parameter_count(m, r.padded_vocab_size, active=True),
        },
        "memory": {
            "device_bytes": plan.hardware.memory_bytes,
            "fits": plan.fits,
            "margin_bytes": plan.margin_bytes,
            "stages": [
                {
                    "stage": s.stage,
                    "params_bytes": s.params_bytes,
                    "grads_bytes": s.grads_bytes,
                    "optimizer_bytes": s.optimizer_bytes,
                    "activation_bytes": s.activation_bytes + s.logits_bytes,
                    "logits_bytes": s.logits_bytes,
                    "buffer_bytes": s.buffer_bytes,
                    "overhead_bytes": s.overhead_bytes,
                    "total_bytes": s.total_bytes,
                    "micro_batches_in_flight": s.in_flight,
                }
                for s in plan.stages
            ],
        },
        "time": {
            "flops_per_step": plan.flops_per_step,
            "step_time_s": plan.time.step_time_s,
            "tokens_per_sec": plan.tokens_per_sec,
            "mfu": plan.mfu,
            **plan.time.terms(),
        },
    }
    if tokens:
        seconds = tokens / plan.tokens_per_sec
        out["time"]["tokens"] = tokens
        out["time"]["wall_time_s"] = seconds
        out["time"]["gpu_hours"] = seconds * r.dims.world_size / 3600
    return out


def layout_name(plan: Plan) -> str:
    c, d = plan.config, plan.resolved.dims
    ac = c.model.activation_checkpointing
    return f"{d.describe()}z{c.parallel.zero_stage} mb{plan.resolved.micro_batch} ac={ac}"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _unit(plan: Plan) -> tuple[str, float]:
    """GB for real models, MB for the small ones the CPU tests plan."""
    return ("GB", 1e9) if plan.largest.total_bytes >= 1e9 else ("MB", 1e6)


def format_plan(plan: Plan, tokens: float | None = None) -> list[str]:
    """The human-readable plan: parameters, memory table, time terms."""
    data = plan_json(plan, tokens)
    r, hw = plan.resolved, plan.hardware
    p = data["parameters"]
    per_rank = [s.params_bytes for s in plan.stages]
    unit, scale = _unit(plan)
    lines = [
        f"plan: {layout_name(plan)} on {r.dims.world_size} x {hw.name}, global batch "
        f"{r.global_batch} = micro {r.micro_batch} x accum {r.grad_accum} x dp {r.dims.dp}, "
        f"{plan.config.precision.dtype}",
        f"parameters: total {_count(p['total'])}, active {_count(p['active'])}, "
        f"weights per rank (largest stage) {max(per_rank) / scale:.2f} {unit}",
        f"memory per rank, {unit} ({scale:.0e} bytes):",
        "  stage   params    grads  optimizer  activations  logits+CE  buffers   total"
        "  (micro-batches in flight)",
    ]
    for s in plan.stages:
        cells = (s.params_bytes, s.grads_bytes, s.optimizer_bytes, s.activation_bytes)
        cells += (s.logits_bytes, s.buffer_bytes, s.total_bytes)
        a, b, c, d, e, f, g = (f"{x / scale:8.2f}" for x in cells)
        lines.append(f"  {s.stage:>5} {a} {b} {c}   {d}   {e} {f} {g}  ({s.in_flight})")
    big = plan.largest
    verdict = "fits" if plan.fits else "does not fit"
    lines += [
        f"  per-process overhead (in every total): {hw.overhead_bytes / 1e9:.2f} GB",
        f"  largest stage {big.stage}: {big.total_bytes / 1e9:.2f} GB of "
        f"{hw.memory_bytes / 1e9:.2f} GB: {verdict}, margin {plan.margin_bytes / 1e9:+.2f} GB",
        "time per step:",
    ]
    t = data["time"]
    for key, value in plan.time.terms().items():
        share = value / t["step_time_s"] if t["step_time_s"] else 0.0
        lines.append(f"  {key[:-2]:<18} {value:12.6f} s  {share:6.1%}")
    lines += [
        f"  flops per step {t['flops_per_step']:.4g}, step {t['step_time_s']:.6g} s, "
        f"{t['tokens_per_sec']:,.0f} tokens/s, MFU {t['mfu']:.1%}",
    ]
    if tokens:
        lines.append(
            f"  {tokens:.4g} tokens: {t['wall_time_s'] / 86400:.2f} days, "
            f"{t['gpu_hours']:,.0f} GPU-hours"
        )
    return lines
