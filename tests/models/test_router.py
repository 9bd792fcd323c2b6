"""The router's math on one rank: sigmoid scores with renormalised top-k weights, a bias that
only selects, renormalised top-1, shared experts, the bias update, and scaletrain's gate
against DeepSpeed's where both can route."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scaletrain.config.schema import ModelConfig
from scaletrain.models.moe import ExpertParallel, MoEMLP, RouterStats
from scaletrain.models.parallel import TensorParallel
from scaletrain.models.router import deepspeed_routes, route
from tests.models.test_moe import CFG, moe_mlp, with_

LOGITS = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tp(tensor_parallel: TensorParallel) -> TensorParallel:
    return tensor_parallel


def test_sigmoid_weights_are_the_chosen_sigmoids_renormalised() -> None:
    scores, chosen, weights = route(LOGITS, 3, "sigmoid", normalize=False)
    torch.testing.assert_close(scores, torch.sigmoid(LOGITS), rtol=0, atol=0)
    top = torch.sigmoid(LOGITS).topk(3, dim=1)
    assert torch.equal(chosen, top.indices)
    torch.testing.assert_close(weights, top.values / top.values.sum(1, keepdim=True))
    torch.testing.assert_close(weights.sum(1), torch.ones(64), rtol=0, atol=1e-6)


def test_bias_only_selects() -> None:
    """A bias of +1 on expert 5 puts it among every token's top-2, yet its weight is its
    unbiased score (renormalised with the other chosen one)."""
    bias = torch.zeros(8)
    bias[5] = 1.0
    for score in ("softmax", "sigmoid"):
        scores, chosen, weights = route(LOGITS, 2, score, normalize=True, bias=bias)
        assert (chosen == 5).any(dim=1).all()
        raw = scores.gather(1, chosen)
        torch.testing.assert_close(weights, raw / raw.sum(1, keepdim=True), rtol=0, atol=0)
        _, unbiased, _ = route(LOGITS, 2, score, normalize=True)
        assert not torch.equal(chosen, unbiased)  # the bias did change the choice


def test_which_gate_routes_each_option() -> None:
    assert deepspeed_routes(CFG)
    assert deepspeed_routes(with_(moe_top_k=8, num_experts=8))
    assert deepspeed_routes(with_(moe_top_k=1))  # DeepSpeed's top-1: the raw probability
    assert not deepspeed_routes(with_(moe_top_k=1, moe_top1_normalize=True))
    assert not deepspeed_routes(with_(moe_score_function="sigmoid"))
    assert not deepspeed_routes(with_(moe_router_bias_update_rate=1e-3))


def outputs(mlp: MoEMLP, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    mlp.train()
    out = mlp(x)
    mlp.stats.fold()
    return out, mlp.stats.collect(None)


@pytest.mark.parametrize("top_k", [3, 4])
@pytest.mark.parametrize("factor", [2.0, 0.5])
def test_own_gate_equals_deepspeeds_top_k_gate(tp: TensorParallel, top_k: int, factor: float):
    """Where DeepSpeed's top-k gate can route (softmax), scaletrain's own routes give the same
    output, gradients, counts and drops (factor 0.5 drops routes)."""
    cfg = with_(num_experts=8, moe_top_k=top_k, moe_capacity_factor=factor, moe_min_capacity=0)
    stats = _assert_own_routes_as_deepspeed(cfg, tp)
    assert (stats["moe_dropped_fraction"] > 0) == (factor < 1)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_without_dropping_own_gate_equals_deepspeeds(tp: TensorParallel, top_k: int) -> None:
    """`moe_drop_tokens: false` always routes through scaletrain's gate (it pads the capacity
    to a multiple of the TP degree, DeepSpeed's gates do not here): the same numbers as
    DeepSpeed's top-1 (raw probability), top-2 and top-k gates on one rank."""
    cfg = with_(num_experts=8, moe_top_k=top_k, moe_drop_tokens=False)
    assert moe_mlp(cfg, tp).moe.deepspeed_moe.gate.own
    _assert_own_routes_as_deepspeed(cfg, tp)


def _assert_own_routes_as_deepspeed(cfg: ModelConfig, tp: TensorParallel) -> dict:
    """Output, gradients, counts, drops and aux loss of our routes equal DeepSpeed's gate's;
    returns our routes' statistics."""
    x = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
    results = []
    for own in (False, True):
        mlp = moe_mlp(cfg, tp)
        mlp.moe.deepspeed_moe.gate.own = own
        out, stats = outputs(mlp, x)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        results.append((out.detach(), grad, stats))
    (ds_out, ds_grad, ds_stats), (out, grad, stats) = results
    torch.testing.assert_close(out, ds_out, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ds_grad, rtol=1e-6, atol=1e-7)
    assert stats["moe_expert_tokens"] == ds_stats["moe_expert_tokens"]
    assert stats["moe_dropped_fraction"] == ds_stats["moe_dropped_fraction"]
    assert stats["moe_aux_loss"] == pytest.approx(ds_stats["moe_aux_loss"], rel=1e-6)
    return stats


def expert_outputs(mlp: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token: [tokens, experts, hidden]."""
    flat = x.reshape(-1, x.shape[-1])
    experts = mlp.moe.deepspeed_moe.experts.deepspeed_experts
    return torch.stack([e(flat) for e in experts], dim=1)


def test_top1_normalize_weights_the_chosen_expert_by_one(tp: TensorParallel) -> None:
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(5))
    raw, normalized = (
        moe_mlp(with_(moe_top_k=1, moe_top1_normalize=flag), tp) for flag in (False, True)
    )
    wg = raw.moe.deepspeed_moe.gate.wg.weight
    probs = F.softmax(x.reshape(-1, 32) @ wg.t(), dim=1)
    top = probs.argmax(1)
    each = expert_outputs(raw, x)[torch.arange(32), top]
    with torch.no_grad():
        raw_out, norm_out = outputs(raw, x)[0], outputs(normalized, x)[0]
    p = probs[torch.arange(32), top].unsqueeze(1)
    torch.testing.assert_close(raw_out.reshape(32, 32), p * each, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(norm_out.reshape(32, 32), each, rtol=1e-5, atol=1e-7)


def test_sigmoid_bias_and_shared_experts_in_the_block(tp: TensorParallel) -> None:
    """The block's output is the weighted sum written out: chosen by sigmoid + bias, weighted
    by the renormalised unbiased sigmoids, plus one SwiGLU of 2 x the width (2 shared)."""
    cfg = with_(
        moe_top_k=2,
        moe_score_function="sigmoid",
        moe_router_bias_update_rate=1e-3,
        moe_shared_experts=2,
    )
    mlp = moe_mlp(cfg, tp)
    gate = mlp.moe.deepspeed_moe.gate
    gate.score_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 2.0]))  # expert 3 always chosen
    assert mlp.shared.down.weight.shape == (32, 2 * 48)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out, stats = outputs(mlp, x)
        scores = torch.sigmoid(x.reshape(-1, 32) @ gate.wg.weight.t())
        chosen = (scores + gate.score_bias).topk(2, dim=1).indices
        weights = scores.gather(1, chosen)
        weights = weights / weights.sum(1, keepdim=True)
        each = expert_outputs(mlp, x)
        routed = (each.gather(1, chosen[..., None].expand(-1, -1, 32)) * weights[..., None]).sum(1)
        want = routed + mlp.shared(x).reshape(32, 32)
    assert (chosen == 3).any(1).all()
    assert stats["moe_expert_tokens"][3] == 32
    torch.testing.assert_close(out.reshape(32, 32), want, rtol=1e-5, atol=1e-6)


def test_bias_update_and_its_checkpointed_fp32_buffer(tp: TensorParallel) -> None:
    cfg = with_(moe_router_bias_update_rate=0.25)
    mlp = moe_mlp(cfg, tp)
    gate = mlp.moe.deepspeed_moe.gate
    gate.update_bias(torch.tensor([10.0, 2.0, 2.0, 2.0]))  # mean 4
    assert gate.score_bias.tolist() == [-0.25, 0.25, 0.25, 0.25]
    gate.update_bias(torch.tensor([4.0, 4.0, 6.0, 2.0]))
    assert gate.score_bias.tolist() == [-0.25, 0.25, 0.0, 0.5]
    key = "moe.deepspeed_moe.gate.score_bias"
    assert mlp.state_dict()[key].tolist() == [-0.25, 0.25, 0.0, 0.5]
    fresh = moe_mlp(cfg, tp)
    fresh.load_state_dict(mlp.state_dict())
    assert torch.equal(fresh.moe.deepspeed_moe.gate.score_bias, gate.score_bias)
    gate.score_bias.add_(1e-3)
    mlp.bfloat16()  # the bias stays fp32: 1e-3 steps would vanish in bf16 around 1
    assert gate.score_bias.dtype == torch.float32
    assert gate.score_bias.tolist() == pytest.approx([-0.249, 0.251, 0.001, 0.501], abs=1e-7)
    assert key not in moe_mlp(CFG, tp).state_dict()  # off: no buffer, checkpoints unchanged


def _favouring_expert_0(tp: TensorParallel, rate: float) -> tuple[MoEMLP, RouterStats]:
    """A top-1 MoE MLP with bias rate `rate` whose router sends every token to expert 0."""
    cfg = with_(moe_top_k=1, moe_top1_normalize=True, moe_router_bias_update_rate=rate)
    stats = RouterStats.of(cfg)
    torch.manual_seed(0)
    mlp = MoEMLP(cfg, tp, ExpertParallel(), 0, stats)
    mlp.moe.set_deepspeed_parallelism()
    with torch.no_grad():  # tokens have a positive mean: expert 0 wins every one
        mlp.moe.deepspeed_moe.gate.wg.weight[0] += 0.03
    return mlp, stats


def test_the_bias_balances_a_router_that_favours_one_expert(tp: TensorParallel) -> None:
    """RouterStats.collect updates the bias each step from the step's loads. A router whose
    weights send every token to expert 0 (max / mean load 4.0 at top-1 of 4) stays below 1.4
    from step 30 on, at rate 0.005 and 512 tokens a step (measured: 1.37 at most in steps
    30-40, 1.11 at the least)."""
    mlp, stats = _favouring_expert_0(tp, rate=0.005)
    gate = mlp.moe.deepspeed_moe.gate
    ratios = []
    for step in range(40):
        x = 1.0 + torch.randn(16, 32, 32, generator=torch.Generator().manual_seed(step))
        mlp.train()
        with torch.no_grad():
            mlp(x)
        stats.fold()
        ratios.append(stats.collect(None)["moe_max_load_ratio"])
    assert ratios[0] == 4.0
    assert max(ratios[30:]) < 1.4, ratios
    assert gate.score_bias[0] < 0 < gate.score_bias[1:].min()


def test_a_skipped_step_leaves_the_bias_as_it_was(tp: TensorParallel) -> None:
    """An fp16 overflow skips the optimizer step (the weights stay): the bias stays too, while
    the step's load is still reported; the next applied step moves it by rate * sign."""
    mlp, stats = _favouring_expert_0(tp, rate=0.25)
    gate = mlp.moe.deepspeed_moe.gate
    x = 1.0 + torch.randn(16, 32, 32, generator=torch.Generator().manual_seed(0))
    for stepped, want in [(False, [0.0, 0.0, 0.0, 0.0]), (True, [-0.25, 0.25, 0.25, 0.25])]:
        with torch.no_grad():
            mlp(x)
        stats.fold()
        metrics = stats.collect(None, stepped=stepped)
        assert metrics["moe_max_load_ratio"] == 4.0
        assert gate.score_bias.tolist() == want


def test_shared_experts_and_top_k_are_counted_by_the_planner(tp: TensorParallel) -> None:
    from scaletrain.plan.flops import parameter_count
    from tests.models.test_moe import PADDED, build

    cfg = with_(num_experts=8, moe_top_k=4, moe_shared_experts=1)
    model = build(cfg, tp)
    assert parameter_count(cfg, PADDED) == sum(p.numel() for p in model.parameters())
    expert = 3 * 32 * 48
    active = parameter_count(cfg, PADDED, active=True)
    assert parameter_count(cfg, PADDED) - active == 2 * (8 - 4) * expert  # 2 MoE layers


def test_split_plan_names_shared_experts_and_the_bias(tp: TensorParallel) -> None:
    """Shared experts split like the dense MLP (gate_up / row) with DeepSeek-V3's HF names;
    the bias buffer (replicated) is named too, so consolidate carries it."""
    from scaletrain.models.registry import family_of
    from scaletrain.models.split_plan import check_saved_split
    from tests.models.test_moe import build

    cfg = with_(moe_shared_experts=1, moe_router_bias_update_rate=1e-3)
    model = build(cfg, tp)
    plan = family_of(cfg).split_plan(cfg)
    for name, param in model.named_parameters():
        split = getattr(param, "tensor_model_parallel", False)
        dim = int(param.partition_dim) if split else None
        check_saved_split(plan, name, dim, int(param.partition_stride) if split else None)
    state = {n for n in model.state_dict() if not n.endswith("_extra_state")}
    named = {name for name, _, _ in plan.expand(cfg.num_layers, cfg.num_experts)}
    assert named == state
    weight, index = plan.find("blocks.1.mlp.shared.gate_up.weight")
    assert weight.split.value == "gate_up"
    assert weight.hf_names(**index) == [
        "model.layers.1.mlp.shared_experts.gate_proj.weight",
        "model.layers.1.mlp.shared_experts.up_proj.weight",
    ]
    weight, index = plan.find("blocks.0.mlp.moe.deepspeed_moe.gate.score_bias")
    assert weight.hf_names(**index) == ["model.layers.0.mlp.gate.e_score_correction_bias"]
