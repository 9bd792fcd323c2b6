"""Step time of a layout: compute at peak x efficiency plus each communication term.

Every term is a number of seconds per optimizer step on the slowest (largest) stage, printed
on its own line by `scaletrain plan` so that a user sees what dominates. Collectives use the
ring cost (an all-reduce moves 2 (n-1)/n of the buffer, a reduce-scatter or all-gather
(n-1)/n) at the link's bandwidth times the hardware's comm efficiency, plus a latency per ring
step. A group stays inside a node when its ranks fit on one node (`topology/dims.py` puts tp
innermost, then dp, then pp).
"""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config.checks import Resolved
from scaletrain.config.moe import expert_capacity
from scaletrain.config.schema import Config
from scaletrain.plan.flops import flops_per_token
from scaletrain.plan.hardware import Hardware
from scaletrain.plan.memory import DTYPE_BYTES, FP32, StageParams

# Share of the data-parallel traffic hidden behind backward compute. Our ds_config leaves
# DeepSpeed's `overlap_comm` at its default: off for ZeRO 0-2 (the reduction runs after
# backward), on for ZeRO-3 (prefetched all-gathers and reduce-scatters run beside compute).
DP_OVERLAP = {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.5}


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step, by term; `step_time_s` is their sum."""

    compute_s: float
    recompute_s: float
    tp_allreduce_s: float
    pipeline_bubble_s: float
    pipeline_send_s: float
    dp_grad_sync_s: float
    zero3_allgather_s: float
    moe_alltoall_s: float

    @property
    def step_time_s(self) -> float:
        return sum(self.terms().values())

    def terms(self) -> dict[str, float]:
        return {
            "compute_s": self.compute_s,
            "recompute_s": self.recompute_s,
            "tp_allreduce_s": self.tp_allreduce_s,
            "pipeline_bubble_s": self.pipeline_bubble_s,
            "pipeline_send_s": self.pipeline_send_s,
            "dp_grad_sync_s": self.dp_grad_sync_s,
            "zero3_allgather_s": self.zero3_allgather_s,
            "moe_alltoall_s": self.moe_alltoall_s,
        }


def ring_allreduce_s(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """Ring all-reduce of `nbytes` over n ranks: 2 (n-1)/n * bytes over the link, 2 (n-1) steps."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * latency


def ring_gather_s(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """Reduce-scatter or all-gather of an `nbytes` (whole) buffer: (n-1)/n of it, n-1 steps."""
    if n <= 1:
        return 0.0
    return (n - 1) / n * nbytes / bandwidth + (n - 1) * latency


def bubble_fraction(pp: int, micro_batches: int) -> float:
    """Idle share of a 1F1B pipeline step: (pp - 1) / (m + pp - 1)."""
    return (pp - 1) / (micro_batches + pp - 1)


def link(hw: Hardware, span: int, world_size: int) -> float:
    """Usable bandwidth of a group whose ranks span `span` consecutive ranks."""
    intra = span <= hw.ranks_per_node(world_size)
    return (hw.intra_node_bw if intra else hw.inter_node_bw) * hw.comm_efficiency


def recompute_fraction(config: Config) -> float:
    """Share of the blocks whose forward runs twice."""
    m = config.model
    if m.activation_checkpointing == "full":
        return 1.0
    if m.activation_checkpointing == "every_n":
        return len(range(0, m.num_layers, m.activation_checkpointing_every)) / m.num_layers
    return 0.0


def step_time(
    config: Config, resolved: Resolved, hw: Hardware, stage: StageParams, blocks: int
) -> StepTime:
    """Seconds per step for one rank of the stage with `blocks` decoder blocks."""
    m, t, dims = config.model, config.train, resolved.dims
    world = dims.world_size
    dtype = config.precision.dtype
    e = DTYPE_BYTES[dtype]
    micro, accum = resolved.micro_batch, resolved.grad_accum
    tokens_micro = micro * t.seq_len
    peak = hw.peak_for(dtype) * hw.efficiency
    per_token = flops_per_token(m, t.seq_len, resolved.padded_vocab_size)
    # The model's FLOPs split evenly over tp x pp x dp; the largest stage sets the pace.
    stage_share = blocks / m.num_layers * dims.pp
    compute = per_token * resolved.global_batch * t.seq_len / world / peak * stage_share
    recompute = compute / 3 * recompute_fraction(config)  # one more forward (1/3 of f+b)

    tp_bw = link(hw, dims.tp, world)
    activation = tokens_micro * m.hidden_size * e
    # Forward: after attention and after the MLP; backward: the two column layers' inputs.
    calls = 4 + 2 * recompute_fraction(config)
    tp = blocks * accum * calls * ring_allreduce_s(activation, dims.tp, tp_bw, hw.latency_s)

    per_micro = (compute + recompute + tp) / accum
    bubble = per_micro * (dims.pp - 1)
    pp_bw = link(hw, dims.tp * dims.dp * 2, world)
    sends = 0.0
    if dims.pp > 1:  # forward activation and backward gradient per micro-batch
        sends = 2 * accum * (activation / pp_bw + hw.latency_s)

    dp_bw = link(hw, dims.tp * dims.dp, world)
    grad_bytes = e if dims.pp == 1 and config.parallel.zero_stage == 0 else FP32
    zero = config.parallel.zero_stage
    dense_grads = stage.dense * grad_bytes
    expert_grads = stage.expert * grad_bytes
    edp = dims.dp // dims.ep
    if zero == 0:  # DeepSpeed's engine all-reduces the gradients
        sync = ring_allreduce_s(dense_grads, dims.dp, dp_bw, hw.latency_s)
        sync += ring_allreduce_s(expert_grads, edp, dp_bw, hw.latency_s)
    else:  # ZeRO 1-3 reduce each bucket onto the ranks that own its partition
        sync = ring_gather_s(dense_grads, dims.dp, dp_bw, hw.latency_s)
        sync += ring_gather_s(expert_grads, edp, dp_bw, hw.latency_s)
    if zero in (1, 2):  # updated 16/32-bit weights all-gathered after the sharded step
        sync += ring_gather_s(stage.dense * e, dims.dp, dp_bw, hw.latency_s)
        sync += ring_gather_s(stage.expert * e, edp, dp_bw, hw.latency_s)
    gather = 0.0
    if zero == 3:  # weights gathered for forward and again for backward, every micro-batch
        gather = 2 * accum * ring_gather_s(stage.dense * e, dims.dp, dp_bw, hw.latency_s)
    overlap = DP_OVERLAP[zero]
    sync, gather = sync * (1 - overlap), gather * (1 - overlap)

    moe = 0.0
    if m.num_experts and dims.ep > 1:
        cap = expert_capacity(
            tokens_micro, m.num_experts, m.moe_capacity_factor, m.moe_top_k, m.moe_min_capacity
        )
        slots = m.num_experts * cap * m.hidden_size * e
        ep_bw = link(hw, dims.tp * dims.ep, world)
        one = (dims.ep - 1) / dims.ep * slots / ep_bw + (dims.ep - 1) * hw.latency_s
        moe_blocks = len(range(0, m.num_layers, m.moe_layer_freq)) * blocks / m.num_layers
        moe = moe_blocks * accum * 4 * one  # dispatch + combine, forward and backward
    return StepTime(compute, recompute, tp, bubble, sends, sync, gather, moe)
