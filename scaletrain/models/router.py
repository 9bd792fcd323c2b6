"""The MoE router: which experts each token goes to and how their outputs are weighted.

DeepSpeed's `TopKGate` (deepspeed/moe/sharded_moe.py) routes with softmax scores only: top-1
weighted by the raw probability (Switch), top-2 and top-k (any k, `topkgating`) renormalised,
capacity and token dropping included. It has no sigmoid scores, no selection bias and no
renormalised top-1. `RoutingGate` is that gate (same weight, same place in DeepSpeed's
`MOELayer`) and hands a config DeepSpeed's gate can route to DeepSpeed's code; for the rest
(`moe_score_function: sigmoid`, `moe_router_bias_update_rate > 0`, `moe_top1_normalize`) it
routes itself and returns DeepSpeed's sparse routes, so the dispatch, the all-to-all and the
combine stay DeepSpeed's.

Aux-loss-free balancing (DeepSeek-V3): `score_bias` is added to the scores only to choose the
top-k experts; the chosen experts are weighted by their unbiased scores. After each optimizer
step `update_bias` moves it by rate * sign(mean load - load) from the step's global counts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import TopKGate
from deepspeed.utils import groups
from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size

from scaletrain.config.schema import ModelConfig


def deepspeed_routes(cfg: ModelConfig) -> bool:
    """Whether DeepSpeed's own gate routes this config (softmax scores, no bias, top-1 raw)."""
    return (
        cfg.moe_score_function == "softmax"
        and cfg.moe_router_bias_update_rate == 0
        and not (cfg.moe_top_k == 1 and cfg.moe_top1_normalize)
    )


def route(
    logits: torch.Tensor,
    k: int,
    score_function: str,
    normalize: bool,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing of [tokens, experts] fp32 logits: (scores, chosen experts [tokens, k],
    their weights [tokens, k]).

    The bias only selects: weights are the unbiased scores of the chosen experts, renormalised
    to sum to 1 when `normalize` (a sigmoid's scores are always renormalised: they do not sum to 1).
    """
    scores = torch.sigmoid(logits) if score_function == "sigmoid" else F.softmax(logits, dim=1)
    choice = scores if bias is None else scores + bias.detach().to(scores.dtype)
    chosen = torch.topk(choice, k=k, dim=1).indices
    weights = scores.gather(1, chosen)
    if normalize or score_function == "sigmoid":
        weights = _renormalized(weights)
    return scores, chosen, weights


def _renormalized(weights: torch.Tensor) -> torch.Tensor:
    """Each token's weights scaled to sum to 1 (a token whose routes were all dropped keeps 0)."""
    return weights / weights.sum(dim=1, keepdim=True).clamp(min=torch.finfo(weights.dtype).eps)


def keep_within_capacity(
    chosen: torch.Tensor, weights: torch.Tensor, experts: int, capacity: int
) -> torch.Tensor:
    """Per expert, the `capacity` routes of the largest score (DeepSpeed's "probs" drop
    policy; ties go to the earlier token): a [tokens, k] mask of the routes kept."""
    tokens = chosen.shape[0]
    routed = torch.zeros(tokens, experts, dtype=weights.dtype, device=weights.device)
    routed.scatter_(1, chosen, weights + 1.0)  # + 1: a chosen route beats an empty slot
    order = torch.sort(routed, dim=0, descending=True, stable=True).indices[:capacity]
    kept = torch.zeros_like(routed, dtype=torch.bool).scatter_(0, order, True)
    return kept.gather(1, chosen)


class RoutingGate(TopKGate):
    """DeepSpeed's `TopKGate` with scaletrain's routing options (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, ep_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(
            cfg.hidden_size,
            cfg.num_experts,
            k=cfg.moe_top_k,
            capacity_factor=cfg.moe_capacity_factor,
            eval_capacity_factor=cfg.moe_eval_capacity_factor,
            min_capacity=cfg.moe_min_capacity,
            noisy_gate_policy=None,
            drop_tokens=cfg.moe_drop_tokens,
            use_rts=False,
            ep_group=ep_group,
            top2_2nd_expert_sampling=False,
        )
        # Without dropping ours routes: it pads the capacity for TP (DeepSpeed's does not here).
        self.own = not deepspeed_routes(cfg) or not cfg.moe_drop_tokens
        # ...and then computes the aux loss as the DeepSpeed gate it stands in for: top-2's
        # counts only each token's first choice (GShard), top-k's all k.
        self.first_choice_aux = deepspeed_routes(cfg) and cfg.moe_top_k == 2
        self.score_function = cfg.moe_score_function
        self.normalize = cfg.moe_top_k > 1 or cfg.moe_top1_normalize
        self.bias_rate = cfg.moe_router_bias_update_rate
        if self.bias_rate > 0:
            # A buffer: saved with the model's state, never trained by the optimizer. Not
            # "expert_bias": DeepSpeed's MoE checkpoint takes every key with "expert" in it
            # for an expert's weight.
            self.register_buffer("score_bias", torch.zeros(cfg.num_experts))

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        """Keep the bias fp32 when the model is cast to bf16 / fp16: steps of `rate` would
        vanish in a 16-bit bias (DeepSeek-V3 keeps it fp32 too)."""
        bias = self._buffers.get("score_bias")
        module = super()._apply(fn, recurse)
        if bias is not None and self.score_bias.dtype != torch.float32:
            self._buffers["score_bias"] = bias.to(self.score_bias.device, torch.float32)
        return module

    def forward(self, input, used_token=None, sparse_routes=False, use_tutel=False):  # type: ignore[override]
        if not self.own:
            return super().forward(input, used_token, sparse_routes, use_tutel)
        assert sparse_routes and used_token is None and not use_tutel, "MOELayer's call only"
        logits = F.linear(input.float(), self.wg.weight.float())
        bias = self.score_bias if self.bias_rate > 0 else None
        scores, chosen, weights = route(logits, self.k, self.score_function, self.normalize, bias)
        tokens, experts = scores.shape
        chosen_mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, chosen, True)
        exp_counts = chosen_mask.sum(0).detach()
        # The load-balancing loss of DeepSpeed's top-k gate; sigmoid scores normalised per
        # token first (DeepSeek-V3's balance loss), so 1.0 is a balanced router either way.
        probs = _renormalized(scores) if self.score_function == "sigmoid" else scores
        counted = F.one_hot(chosen[:, 0], experts) if self.first_choice_aux else chosen_mask
        share = 1 if self.first_choice_aux else self.k
        l_aux = (probs.mean(0) * counted.float().mean(0)).mean() * experts * experts / share
        capacity = self._capacity(tokens, experts, exp_counts)
        raw = scores.detach().gather(1, chosen)  # drops rank by the unnormalised score
        kept = keep_within_capacity(chosen, raw, experts, capacity)
        weights = weights * kept
        if self.normalize:  # renormalised over the routes kept, as DeepSpeed's gates do
            weights = _renormalized(weights)
        # Slot of each kept route in its expert's buffer, in token order (a token picks an
        # expert at most once).
        kept_mask = torch.zeros_like(scores, dtype=torch.int64).scatter_(1, chosen, kept.long())
        locations = (kept_mask.cumsum(0) - 1).gather(1, chosen) * kept
        indices = torch.where(kept, chosen, torch.full_like(chosen, -1))
        return (
            l_aux,
            torch.tensor(capacity),
            experts,
            indices.t().contiguous().to(torch.int32),
            locations.t().contiguous().to(torch.int32),
            weights.t().contiguous(),
            exp_counts,
        )

    def _capacity(self, tokens: int, experts: int, exp_counts: torch.Tensor) -> int:
        """DeepSpeed's: ceil(tokens / experts * factor * k), at least min_capacity; without
        dropping, the busiest expert's count over the EP group, rounded up to a multiple of the
        TP degree: DeepSpeed's MoE layer splits every expert's slots over the TP ranks (its
        own gates pad only when `expert_tensor_parallel_world_size` is set, which it is not
        without expert tensor parallelism)."""
        if self.drop_tokens:
            factor = self.capacity_factor if self.training else self.eval_capacity_factor
            slots = torch.ceil(torch.tensor(tokens / experts) * torch.tensor(factor * self.k))
            return max(int(slots), self.min_capacity)
        busiest = exp_counts.max().clone()
        if self.ep_group is not None and dist.get_world_size(group=self.ep_group) > 1:
            dist.all_reduce(busiest, op=dist.ReduceOp.MAX, group=self.ep_group)
        tp = bwc_tensor_model_parallel_world_size(groups.mpu)
        return -(-int(busiest) // tp) * tp

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """bias += rate * sign(mean load - load), from one step's global tokens per expert."""
        load = load.to(self.score_bias.device, torch.float64)
        step = self.bias_rate * torch.sign(load.mean() - load)
        self.score_bias += step.to(self.score_bias.dtype)


def bias_rows(
    gates: dict[int, RoutingGate],
    layer_tokens: dict[int, torch.Tensor],
    shape: tuple[int, int],
    layer_freq: int,
    first_dp_rank: bool,
) -> torch.Tensor:
    """This rank's share of every MoE layer's [loads; biases] (rows by MoE-layer ordinal,
    block // layer_freq), flat: zeros for other stages' layers and the bias from DP rank 0
    only, so that sums over the DP and pipeline groups are exact."""
    loads = torch.zeros(shape, dtype=torch.float64)
    biases = torch.zeros_like(loads)
    for index, gate in gates.items():
        row = index // layer_freq
        if index in layer_tokens:
            loads[row] = layer_tokens[index].cpu().double()
        if first_dp_rank:
            biases[row] = gate.score_bias.cpu().double()
    return torch.cat([loads.flatten(), biases.flatten()])


def update_biases(
    gates: dict[int, RoutingGate],
    reduced: torch.Tensor,
    shape: tuple[int, int],
    layer_freq: int,
    stepped: bool = True,
) -> dict[str, object]:
    """Move every router's bias by the step's global loads (`bias_rows` summed over the
    ranks), unless the optimizer skipped the step (`stepped` False: an fp16 overflow leaves the
    weights as they were, so the bias stays too); the metrics: the worst layer's max / mean
    load, and the biases it routed with."""
    loads, biases = reduced.view(2, *shape).unbind(0)
    for index, gate in gates.items():
        if stepped:
            gate.update_bias(loads[index // layer_freq])
    mean = loads.mean(dim=1).clamp(min=1.0)
    return {
        "moe_max_load_ratio": (loads.max(dim=1).values / mean).max().item(),
        "moe_router_bias": [[float(b) for b in row] for row in biases.tolist()],
    }
