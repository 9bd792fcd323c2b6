"""Per-rank memory of a layout, one row per pipeline stage, from the config alone.

Each term follows what this code base really allocates (docs/planning.md derives them):
model states as DeepSpeed 0.19 holds them when the optimizer steps (measured on CPU ranks by
`scaletrain.plan.measure`), activations as autograd saves them for our block
(`scaletrain.models.layers`), buffers as our ds_config sizes them (`engine/deepspeed.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config.checks import Resolved
from scaletrain.config.moe import expert_capacity
from scaletrain.config.schema import Config, ModelConfig
from scaletrain.plan.flops import parameter_count

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FP32 = 4
DEFAULT_BUCKET = 500_000_000  # DeepSpeed's default bucket (engine/deepspeed.py), elements
ZERO3_MAX_LIVE = 1_000_000_000  # DeepSpeed's stage3_max_live_parameters default, elements


@dataclass(frozen=True)
class StageParams:
    """Parameters one rank of a pipeline stage holds (after TP, PP and EP splits)."""

    dense: int
    """Replicated over the data-parallel group (sharded by ZeRO over dp)."""
    expert: int
    """MoE experts: replicated over the expert-data-parallel group (dp / ep)."""
    blocks: int
    moe_blocks: int
    first: bool
    last: bool
    largest_layer: int
    """Largest single layer on the stage (its parameters, this TP rank): what ZeRO-3 gathers."""


@dataclass(frozen=True)
class StageMemory:
    """One row of the memory table, bytes per rank."""

    stage: int
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    logits_bytes: float
    buffer_bytes: float
    overhead_bytes: float
    in_flight: int

    @property
    def total_bytes(self) -> float:
        return (
            self.params_bytes
            + self.grads_bytes
            + self.optimizer_bytes
            + self.activation_bytes
            + self.logits_bytes
            + self.buffer_bytes
            + self.overhead_bytes
        )

    @property
    def states_bytes(self) -> float:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes


def stage_blocks(config: Config, padded_vocab: int, pp: int) -> list[range]:
    """Decoder blocks of each stage: uniform (num_layers / pp each) or balanced by weights as
    DeepSpeed's `partition_balanced` does over embedding, blocks, norm, head."""
    layers = config.model.num_layers
    if pp == 1 or config.parallel.pipeline_partition == "uniform":
        per = layers // pp
        return [range(s * per, (s + 1) * per) for s in range(pp)]
    from scaletrain.plan.partition import balanced_blocks

    return balanced_blocks(config.model, padded_vocab, pp)


def stage_params(config: Config, resolved: Resolved) -> list[StageParams]:
    """What one rank of every pipeline stage holds."""
    m, dims = config.model, resolved.dims
    tp, ep, vocab = dims.tp, dims.ep, resolved.padded_vocab_size
    h, f = m.hidden_size, m.ffn_size
    attn = (h * (m.num_heads + 2 * m.kv_heads) * m.head_dim + m.num_heads * m.head_dim * h) // tp
    mlp = 3 * h * f // tp
    embedding = vocab * h // tp
    out = []
    ranges = stage_blocks(config, vocab, dims.pp)
    moe = _moe_flags(m)
    for s, blocks in enumerate(ranges):
        first, last = s == 0, s == dims.pp - 1
        n_moe = sum(moe[i] for i in blocks)
        dense = len(blocks) * (attn + 2 * h) + (len(blocks) - n_moe) * mlp
        dense += n_moe * h * m.num_experts  # the router is a plain Linear, whole on every rank
        shared = m.moe_shared_experts * mlp  # TP-split like the dense MLP, replicated over EP
        dense += n_moe * shared
        expert = n_moe * (m.num_experts // ep) * mlp
        moe_block = expert // max(n_moe, 1) + shared
        layers = [attn + 2 * h + (mlp if not moe[i] else moe_block) for i in blocks]
        if first:
            dense += embedding
            layers.append(embedding)
        if last:
            dense += h  # final norm
            # An own head; a tied head on a later stage holds a copy of the embedding.
            if not m.tie_embeddings or dims.pp > 1:
                dense += embedding
                layers.append(embedding)
        out.append(StageParams(dense, expert, len(blocks), n_moe, first, last, max(layers)))
    return out


def _moe_flags(m: ModelConfig) -> list[bool]:
    return [m.num_experts > 0 and i % m.moe_layer_freq == 0 for i in range(m.num_layers)]


def model_states(params: float, dtype: str, zero: int, shards: int) -> tuple[float, float, float]:
    """(params, grads, optimizer) bytes at the step's peak, late in backward, for `params`
    weights sharded over `shards` ranks: as `states_at_step`, except that ZeRO-1 still holds
    the full fp32 gradients there (it reduces them at the boundary; ZeRO-2 reduces each bucket
    as it fills, so only its partition accumulates)."""
    weights, grads, optimizer = states_at_step(params, dtype, zero, shards)
    if zero == 1:
        grads = FP32 * params
    return weights, grads, optimizer


def states_at_step(params: float, dtype: str, zero: int, shards: int) -> tuple[float, float, float]:
    """(params, grads, optimizer) bytes when the optimizer steps, as DeepSpeed 0.19 holds them
    (torch AdamW, two fp32 moments; measured on CPU ranks in tests/plan/test_model_states.py):

    - ZeRO-0 fp32: weights 4, gradients 4, moments 8 bytes per parameter.
    - ZeRO-0 bf16/fp16: 16-bit weights 2; gradients 2 (16-bit) + 4 (the fp32 copy the
      wrapper steps on); fp32 master 4 + moments 8.
    - ZeRO-1/2: weights e (whole); the gradient partition in e plus its fp32 copy (e + 4) / dp;
      fp32 master + moments 12 / dp. fp32 runs keep a master copy too (DeepSpeed clones).
    - ZeRO-3: as ZeRO-2 with the weights partitioned too (e / dp); in fp32 the master is the
      weight partition itself (stage3.py shares it when the dtypes agree), so optimizer 8 / dp.
    """
    e = DTYPE_BYTES[dtype]
    if zero == 0:
        if dtype == "fp32":
            return 4.0 * params, 4.0 * params, 8.0 * params
        return e * params, (e + FP32) * params, 12.0 * params
    weights = e * params / shards if zero == 3 else e * params
    optimizer = (8.0 if zero == 3 and dtype == "fp32" else 12.0) * params / shards
    return weights, (e + FP32) * params / shards, optimizer


def in_flight(pp: int, stage: int, micro_batches: int) -> int:
    """Micro-batches whose activations a stage holds at once under DeepSpeed's 1F1B schedule."""
    return min(pp - stage, micro_batches)


def block_activation_bytes(config: Config, micro_batch: int, tp: int, attention: str) -> float:
    """Bytes autograd saves for one dense decoder block and one micro-batch (no recompute).

    Per token, with e the activation bytes, TP-split widths divided by tp (checked against
    autograd's saved tensors in tests/plan/test_activations.py):
    each RMSNorm: its fp32 input and fp32 normalised value (torch computes the norm in fp32),
    the fp32 rstd, and its output in e (the next linear's input);
    attention: the qkv output (v is a view that keeps all of it), rotated q and k, the
    attention output (also the out projection's input, a view), the kernel's fp32
    logsumexp — with the math kernel the b*heads*s*s softmax (plus its fp32 copy at low
    precision) instead of the logsumexp;
    MLP: the gate|up output (gate and up are views of it), silu(gate), the product.
    """
    m, t = config.model, config.train
    e = DTYPE_BYTES[config.precision.dtype]
    s, h, f, d = t.seq_len, m.hidden_size, m.ffn_size, m.head_dim
    heads, kv = m.num_heads // tp, m.kv_heads // tp
    tokens = micro_batch * s
    norm = 2 * h * FP32 + FP32 + h * e
    attn = norm + (heads + 2 * kv) * d * e + (heads + kv) * d * e + heads * d * e
    if attention == "flash":
        attn += heads * FP32
    else:
        attn += heads * s * (e + (FP32 if e != FP32 else 0))
    mlp = norm + 4 * f // tp * e
    return float(tokens * (attn + mlp))


def moe_activation_bytes(config: Config, resolved: Resolved, micro_batch: int) -> float:
    """Extra bytes of an MoE block over a dense one, per micro-batch: DeepSpeed's top-k gate
    (router logits and probabilities, fp32), dispatch mask and combine weights
    (tokens x experts x capacity), the dispatched and returned token slots (experts x capacity
    x hidden, both sides of the all-to-all), and the experts' own saved tensors for the
    capacity slots this rank computes, minus the dense MLP it replaces."""
    m, t, dims = config.model, config.train, resolved.dims
    e = DTYPE_BYTES[config.precision.dtype]
    tokens = micro_batch * t.seq_len
    cap = expert_capacity(
        tokens, m.num_experts, m.moe_capacity_factor, m.moe_top_k, m.moe_min_capacity
    )
    h, f = m.hidden_size, m.ffn_size
    router = tokens * m.num_experts * 2 * FP32
    masks = tokens * m.num_experts * cap * (FP32 + 1)
    slots = m.num_experts * cap * h * e * 3  # dispatched, after all-to-all, expert output
    expert_tokens = m.num_experts * cap  # ep ranks x local experts x capacity
    experts = expert_tokens * (h * e + 4 * f // dims.tp * e)
    dense_mlp = tokens * (h * e + 4 * f // dims.tp * e)
    shared = m.moe_shared_experts * dense_mlp  # always-active experts: a dense MLP each
    return float(router + masks + slots + experts + shared - dense_mlp)


def activation_bytes(
    config: Config,
    resolved: Resolved,
    blocks: range,
    micro_batch: int,
    attention: str,
    in_flight: int = 1,
) -> float:
    """`in_flight` micro-batches of a stage's blocks, by recompute mode: a recomputed block
    keeps only its input; while one is recomputed in backward its full activations exist
    once more, once per stage (backward recomputes one block of one micro-batch at a time)."""
    m = config.model
    e = DTYPE_BYTES[config.precision.dtype]
    full = block_activation_bytes(config, micro_batch, resolved.dims.tp, attention)
    moe_extra = moe_activation_bytes(config, resolved, micro_batch) if m.num_experts else 0.0
    flags = _moe_flags(m)
    keep_input = micro_batch * config.train.seq_len * m.hidden_size * e
    total, recomputed = 0.0, 0.0
    for i in blocks:
        block = full + (moe_extra if flags[i] else 0.0)
        mode, every = m.activation_checkpointing, m.activation_checkpointing_every
        if mode == "full" or (mode == "every_n" and i % every == 0):
            total += keep_input
            recomputed = max(recomputed, block)
        else:
            total += block
    return total * in_flight + recomputed


def logits_bytes(config: Config, resolved: Resolved, micro_batch: int) -> float:
    """Last stage: the vocabulary head's output and megatron-core's cross-entropy, which
    turns an fp32 copy of the logits into the softmax in place (and the gradient in place
    in backward); at bf16/fp16 the 16-bit logits exist beside it."""
    tokens = micro_batch * config.train.seq_len
    local_vocab = resolved.padded_vocab_size // resolved.dims.tp
    e = DTYPE_BYTES[config.precision.dtype]
    return float(tokens * local_vocab * (FP32 + (e if e != FP32 else 0)))


def buffer_bytes(
    config: Config, resolved: Resolved, params: StageParams, backward_bytes: float
) -> float:
    """Communication buffers, as far as they raise the peak above the model states plus
    `backward_bytes` (the activations and logits). Buckets are our ds_config's,
    `min(5e8, model parameters)` elements, allocated at that size whatever the rank holds.
    The peak is the larger of two moments (profiled in docs/planning.md):

    - during backward: ZeRO-1/2 without pipelining fill the contiguous-gradient bucket (in
      e); ZeRO-3 also holds the gathered weights it keeps live (`stage3_max_live_parameters`,
      1e9 elements, at least the largest layer) and their full gradients, in e;
    - after backward, when the activations are gone: ZeRO-0 flattens the gradients for the
      all-reduce (up to 5e8 elements); under DeepSpeed's pipeline engine ZeRO-1 reduces from
      two bucket-sized buffers.
    """
    m = config.model
    dtype, zero, dp = config.precision.dtype, config.parallel.zero_stage, resolved.dims.dp
    e = DTYPE_BYTES[dtype]
    bucket = min(DEFAULT_BUCKET, max(parameter_count(m, resolved.padded_vocab_size), 1_000_000))
    own = params.dense + params.expert
    during, after = 0.0, 0.0
    if zero == 0:
        after = min(DEFAULT_BUCKET, own) * e if dp > 1 else 0.0
    elif zero in (1, 2) and resolved.dims.pp > 1:
        after = 2.0 * bucket * e
    elif zero in (1, 2):
        during = bucket * e
    else:
        gathered = max(params.largest_layer, min(ZERO3_MAX_LIVE, own))
        during = 2.0 * gathered * e + bucket * e
    return float(max(backward_bytes + during, after) - backward_bytes)
