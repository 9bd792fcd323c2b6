"""Mixtral-style mixture-of-experts MLP on DeepSpeed's MoE layer, and the router's numbers.

Routing, capacity, token dropping, the all-to-all between expert-parallel ranks and the
load-balancing loss are DeepSpeed's (`deepspeed.moe.layer.MoE`); the experts are our SwiGLU,
tensor-parallel like the dense MLP (DeepSpeed's "expert tensor parallelism"), so an expert's
gradient norm is counted exactly like a dense weight's. The router losses enter backward inside
each block (`RouterLossScaler`, megatron-core's way), so that a pipeline stage trains its own
routers without anything extra crossing stage boundaries.

Expert parallelism: DeepSpeed splits the data-parallel ranks of each TP rank into groups of
`ep` consecutive DP ranks; DP rank d holds experts [(d % ep) * E/ep, (d % ep + 1) * E/ep).
Every expert is initialised from its own seed (run seed, block, global expert index), so any
EP degree holds exactly the experts EP=1 holds at those indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from scaletrain.config.schema import ModelConfig
from scaletrain.models.layers import SwiGLU
from scaletrain.models.parallel import TensorParallel, seeded_rng

if TYPE_CHECKING:
    from scaletrain.models.router import RoutingGate


SHARED_SEED = 4098
"""The shared experts' seed offset within a block: past every routed expert's (< 4099)."""


def moe_blocks(cfg: ModelConfig) -> list[bool]:
    """Which decoder blocks are MoE: 0, n, 2n, ... (n = moe_layer_freq); none if dense."""
    return [cfg.num_experts > 0 and i % cfg.moe_layer_freq == 0 for i in range(cfg.num_layers)]


@dataclass(frozen=True)
class ExpertParallel:
    """This rank's place among the expert-parallel ranks."""

    size: int = 1
    rank: int = 0

    @classmethod
    def of(cls, ep: int, dp_rank: int) -> ExpertParallel:
        """DeepSpeed's layout: EP groups are runs of `ep` consecutive data-parallel ranks."""
        return cls(ep, dp_rank % ep)


class Expert(SwiGLU):
    """One expert: the SwiGLU MLP over a flat list of tokens.

    DeepSpeed hands experts [ep, 1, capacity, hidden] slots; megatron-core's linear layers
    want [tokens, batch, hidden].
    """

    def __init__(self, cfg: ModelConfig, tp: TensorParallel) -> None:
        super().__init__(cfg, tp)
        self.register_state_dict_post_hook(_empty_extra_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, 1, x.shape[-1])).reshape(x.shape)


def _empty_extra_state(module: nn.Module, state: dict, prefix: str, metadata: dict) -> None:
    """megatron-core's layers save an `_extra_state` of None, which DeepSpeed's expert
    checkpoint cannot copy (it clones every entry); an empty tensor means the same to them."""
    for key in [k for k, v in state.items() if k.endswith("_extra_state") and v is None]:
        state[key] = torch.zeros(0)


@dataclass
class _Step:
    """Router numbers summed over this rank's MoE layers and micro-batches of one step.

    Kept as tensors where the layers put them: reading them (a device sync) waits for
    `collect`, once per step, instead of every micro-batch. Losses are summed in float64, as
    Python floats would be.
    """

    aux_loss: torch.Tensor | float = 0.0
    z_loss: torch.Tensor | float = 0.0
    micro_batches: int = 0
    expert_tokens: torch.Tensor | None = None
    dropped: torch.Tensor | int = 0
    routed: int = 0
    layer_tokens: dict[int, torch.Tensor] = field(default_factory=dict)
    """Tokens per expert of each MoE block (by block index): the bias updates' loads."""


class RouterLossScaler(torch.autograd.Function):
    """Identity on an MoE block's output whose backward also back-propagates the block's
    router loss, scaled as the main loss was (`RouterStats.backward_scale`).

    megatron-core's `MoEAuxLossAutoScaler`: the router loss enters backward on the rank that
    owns the router, when its output's gradient arrives, so a pipeline stage needs nothing
    from the stages after it but the usual activation gradient.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, router_loss: torch.Tensor, stats: RouterStats):
        ctx.save_for_backward(router_loss)
        ctx.stats = stats
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (router_loss,) = ctx.saved_tensors
        scale = torch.full_like(router_loss, ctx.stats.backward_scale)
        return grad_output, scale, None


@dataclass
class RouterStats:
    """What the MoE layers of one model (or one pipeline stage) report: the gradient scale of
    their router losses, and the step's totals (for metrics.jsonl).

    Layers write into per-layer slots that each forward overwrites, so that recomputing a
    checkpointed block in backward does not count it twice; the model (`GPT.forward`, a
    pipeline stage's forward) folds the slots into the step once per micro-batch, the trainer
    collects (and resets) them once per step.
    """

    num_experts: int
    moe_layers: int = 1
    """MoE blocks of the whole model: losses are means over them, whichever stage holds them."""
    aux_coeff: float = 0.0
    z_coeff: float = 0.0
    backward_scale: float = 1.0
    """d(loss the engine back-propagates) / d(loss): the fp16 loss scale / gradient
    accumulation steps. The trainer sets it before every step; 1 for a plain backward."""
    aux: dict[int, torch.Tensor] = field(default_factory=dict)
    z: dict[int, torch.Tensor] = field(default_factory=dict)
    counts: dict[int, torch.Tensor] = field(default_factory=dict)
    dropped: dict[int, torch.Tensor] = field(default_factory=dict)
    routed: dict[int, int] = field(default_factory=dict)
    step: _Step = field(default_factory=_Step)
    layer_freq: int = 1
    """model.moe_layer_freq: MoE block i is the model's (i // layer_freq)-th MoE layer."""
    biased: bool = False
    """model.moe_router_bias_update_rate > 0: `collect` also updates the routers' biases."""
    gates: dict[int, RoutingGate] = field(default_factory=dict)
    """This rank's routers, by block index (the bias updates' targets)."""

    @classmethod
    def of(cls, cfg: ModelConfig) -> RouterStats:
        layers = sum(moe_blocks(cfg))
        stats = cls(cfg.num_experts, layers, cfg.moe_aux_loss_coeff, cfg.moe_z_loss_coeff)
        stats.layer_freq = cfg.moe_layer_freq
        stats.biased = cfg.moe_router_bias_update_rate > 0
        return stats

    def router_loss(self, aux: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """One layer's share of coeff * mean(aux) + coeff * mean(z) over the model's MoE layers."""
        loss = self.aux_coeff * aux / self.moe_layers
        return loss if z is None else loss + self.z_coeff * z / self.moe_layers

    def fold(self) -> None:
        """Add this forward's numbers to the step's (a stage without MoE blocks adds none)."""
        s = self.step
        s.micro_batches += 1
        if not self.aux:
            return
        s.aux_loss = s.aux_loss + torch.stack(list(self.aux.values())).detach().double().sum()
        if self.z:
            s.z_loss = s.z_loss + torch.stack(list(self.z.values())).detach().double().sum()
        counts = torch.stack(list(self.counts.values())).sum(0).to(torch.int64)
        s.expert_tokens = counts if s.expert_tokens is None else s.expert_tokens + counts
        for index, layer_counts in self.counts.items():
            before = s.layer_tokens.get(index, 0)
            s.layer_tokens[index] = before + layer_counts.detach().to(torch.int64)
        s.dropped = s.dropped + torch.stack(list(self.dropped.values())).sum()
        s.routed += sum(self.routed.values())

    def collect(
        self,
        dp_group: dist.ProcessGroup | None,
        pp_group: dist.ProcessGroup | None = None,
        device: torch.device | None = None,
        stepped: bool = True,
    ) -> dict[str, object]:
        """Collective over the data-parallel, then the pipeline ranks (every stage joins,
        with or without MoE blocks): the step's metrics; then start a new step. `stepped`:
        the optimizer applied this step (False on an fp16 overflow: the biases stay).

        Losses are means over the model's MoE layers, micro-batches and DP ranks (like the
        loss); token counts are sums over MoE layers, micro-batches and DP ranks, i.e. over
        the global batch. The same numbers on every layout.
        """
        s, self.step = self.step, _Step()
        tokens = s.expert_tokens if s.expert_tokens is not None else torch.zeros(self.num_experts)
        totals = [float(s.aux_loss), float(s.z_loss), int(s.dropped), s.routed]
        parts = [torch.tensor(totals), tokens.cpu().double()]
        if self.biased:
            from scaletrain.models.router import bias_rows, update_biases

            first = not dist.is_initialized() or dist.get_rank(group=dp_group) == 0
            shape = (self.moe_layers, self.num_experts)
            parts.append(bias_rows(self.gates, s.layer_tokens, shape, self.layer_freq, first))
        packed = torch.cat(parts).double()
        ranks = 1
        if dist.is_initialized():
            # On the model's device (NCCL reduces only device tensors).
            packed = packed.to(device or torch.device("cpu"))
            dist.all_reduce(packed, group=dp_group)
            ranks = dist.get_world_size(group=dp_group)
            if pp_group is not None and dist.get_world_size(group=pp_group) > 1:
                dist.all_reduce(packed, group=pp_group)
        n = max(s.micro_batches, 1) * ranks * self.moe_layers
        metrics: dict[str, object] = {
            "moe_aux_loss": packed[0].item() / n,
            "moe_expert_tokens": [int(t) for t in packed[4 : 4 + self.num_experts].tolist()],
            "moe_dropped_fraction": packed[2].item() / max(packed[3].item(), 1.0),
        }
        if self.z_coeff > 0:
            metrics["moe_z_loss"] = packed[1].item() / n
        if self.biased:
            shape = (self.moe_layers, self.num_experts)
            reduced = packed[4 + self.num_experts :].cpu()
            metrics.update(update_biases(self.gates, reduced, shape, self.layer_freq, stepped))
        return metrics


class MoEMLP(nn.Module):
    """The MLP of an MoE block: router + experts, DeepSpeed's MoE layer with our SwiGLU."""

    def __init__(
        self,
        cfg: ModelConfig,
        tp: TensorParallel,
        ep: ExpertParallel,
        index: int,
        stats: RouterStats,
    ) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        from scaletrain.models.router import RoutingGate  # imports DeepSpeed

        _gather_tokens_on_gloo()
        self.index, self.stats = index, stats
        self.z_loss = cfg.moe_z_loss_coeff > 0
        self.router_losses = self.z_loss or cfg.moe_aux_loss_coeff > 0
        self.ep = ep
        self.moe = MoE(
            cfg.hidden_size,
            nn.Identity(),  # a placeholder to copy; the real experts are installed below
            num_experts=cfg.num_experts,
            ep_size=ep.size,
            k=cfg.moe_top_k,
            capacity_factor=cfg.moe_capacity_factor,
            eval_capacity_factor=cfg.moe_eval_capacity_factor,
            min_capacity=cfg.moe_min_capacity,
            drop_tokens=cfg.moe_drop_tokens,
            # Deterministic routing: no noisy gate, no random token selection, no sampled
            # second expert, so every layout routes every token the same way.
            noisy_gate_policy=None,
            use_rts=False,
            top2_2nd_expert_sampling=False,
            enable_expert_tensor_parallelism=True,
        )
        layer = self.moe.deepspeed_moe
        with torch.random.fork_rng(devices=[]):  # built like DeepSpeed's gate, RNG untouched
            gate = RoutingGate(cfg)
        gate.wg = layer.gate.wg
        layer.gate = gate
        if stats.biased:
            stats.gates[index] = gate
        nn.init.normal_(layer.gate.wg.weight, std=cfg.init_std)
        layer.experts.deepspeed_experts = nn.ModuleList(
            self._expert(cfg, tp, index, ep.rank * self.moe.num_local_experts + i)
            for i in range(self.moe.num_local_experts)
        )
        for param in layer.experts.deepspeed_experts.parameters():
            # What DeepSpeed's Experts marks: kept out of the dense all-reduce, reduced over
            # the expert-data-parallel group instead.
            param.allreduce = False
            param.group_name = self.moe.expert_group_name
        layer.gate.register_forward_hook(self._count_dropped)
        self.shared = None
        if cfg.moe_shared_experts:
            # One SwiGLU of n x the experts' width is the sum of n shared experts (DeepSeek-V3's
            # HF layout too); a dense, TP-split MLP replicated over EP, from its own seed.
            width = cfg.moe_shared_experts * cfg.ffn_size
            with seeded_rng(torch.initial_seed() * 1_000_003 + index * 4099 + SHARED_SEED):
                self.shared = SwiGLU(replace(cfg, ffn_hidden_size=width), tp)

    @staticmethod
    def _expert(cfg: ModelConfig, tp: TensorParallel, block: int, expert: int) -> Expert:
        """Expert `expert` (global index) of block `block`, from its own seed."""
        with seeded_rng(torch.initial_seed() * 1_000_003 + block * 4099 + expert):
            return Expert(cfg, tp)

    def _count_dropped(self, gate: nn.Module, args: tuple, output: tuple) -> None:
        # The gate's routes (MOELayer asks for sparse routes) flag a dropped one with -1.
        if self.training:
            routes = output[3]
            self.stats.dropped[self.index] = (routes < 0).sum()
            self.stats.routed[self.index] = routes.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, aux, counts = self.moe(x)
        if self.shared is not None:
            out = out + self.shared(x)
        if not self.training:
            return out
        z = None
        if self.z_loss:
            wg = self.moe.deepspeed_moe.gate.wg.weight
            logits = F.linear(x.reshape(-1, x.shape[-1]).float(), wg.float())
            z = torch.logsumexp(logits, dim=-1).pow(2).mean()
            self.stats.z[self.index] = z.detach()
        self.stats.aux[self.index] = aux.detach()
        self.stats.counts[self.index] = counts
        if self.router_losses and torch.is_grad_enabled():
            out = RouterLossScaler.apply(out, self.stats.router_loss(aux, z), self.stats)
        return out


def create_expert_groups(ep: int, mpu: object) -> None:
    """Every rank creates DeepSpeed's expert groups (of degree `ep`) before any MoE layer
    asks for them.

    `dist.new_group` is collective over the whole world. Left to DeepSpeed, only the ranks of
    a stage that holds an MoE block would create them (in `deepspeed.initialize`), and a stage
    without one (the embedding's, every other block with moe_layer_freq > 1) would never join:
    the hang of DeepSpeed #6714. Made here with DeepSpeed's own function over the whole
    world's layout (pp included), every MoE layer then finds its group and makes none; a stage
    without MoE blocks joins no MoE collective after this.
    """
    from deepspeed.utils import groups

    if f"ep_size_{ep}" in groups._get_expert_parallel_group_dict():
        return
    groups.mpu = mpu  # its DP size decides the groups; the engine sets the same sizes again
    groups._create_expert_data_and_model_parallel(ep, mpu=mpu)


def check_expert_layout(model: nn.Module) -> None:
    """After deepspeed.initialize: DeepSpeed's EP groups put each rank where its experts'
    initialisation assumed (`ExpertParallel.of`)."""
    for module in model.modules():
        if isinstance(module, MoEMLP) and module.ep.size > 1:
            group = module.moe.deepspeed_moe.ep_group
            actual = dist.get_rank(group=group)
            if actual != module.ep.rank or dist.get_world_size(group=group) != module.ep.size:
                raise RuntimeError(
                    f"expert-parallel rank {actual} of DeepSpeed's group differs from the "
                    f"assumed {module.ep.rank}: its EP rank layout changed"
                )


def _gather_tokens_on_gloo() -> None:
    """With TP > 1 DeepSpeed's MoE all-gathers expert slots over the TP ranks into a flat
    buffer, which gloo's all_gather_into_tensor refuses ("invalid tensor size"; NCCL takes
    it). On gloo, gather into a buffer of shape [tp * rows, ...] instead: the same bytes in the
    same order, so DeepSpeed's code after the gather is unchanged."""
    import deepspeed.comm
    from deepspeed.moe import mappings
    from deepspeed.utils.bwc import (
        bwc_tensor_model_parallel_group,
        bwc_tensor_model_parallel_world_size,
    )

    if not dist.is_initialized() or dist.get_backend() != "gloo":
        return
    if getattr(mappings._gather_tokens, "gloo_safe", False):
        return

    def gather_tokens(input_: torch.Tensor, dim: int = 0) -> torch.Tensor:
        mpu = deepspeed.utils.groups.mpu
        input_ = input_.contiguous()
        world_size = bwc_tensor_model_parallel_world_size(mpu)
        if world_size == 1:
            return input_
        shape = (world_size * input_.shape[0], *input_.shape[1:])
        gathered = torch.empty(shape, dtype=input_.dtype, device=input_.device)
        group = bwc_tensor_model_parallel_group(mpu)
        deepspeed.comm.all_gather_into_tensor(gathered, input_, group=group)
        if dim == 0:
            return gathered
        return torch.cat(gathered.chunk(world_size, dim=0), dim=dim).contiguous()

    gather_tokens.gloo_safe = True  # type: ignore[attr-defined]
    mappings._gather_tokens = gather_tokens
