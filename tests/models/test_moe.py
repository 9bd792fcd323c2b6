"""The MoE block on one rank: which blocks are MoE, expert init across EP degrees, capacity,
dropping, the router losses and statistics, and the parameter counts of the presets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml

from scaletrain.config.moe import expert_capacity
from scaletrain.config.schema import ModelConfig
from scaletrain.models.gpt import GPT
from scaletrain.models.moe import ExpertParallel, MoEMLP, RouterStats, moe_blocks
from scaletrain.models.parallel import TensorParallel
from scaletrain.plan.flops import flops_per_token, matmul_params, moe_layer_count, parameter_count
from scaletrain.topology.init import seed_everything
from tests.distributed import REPO
from tests.models.tiny import DENSE, PADDED, derive

MODELS = REPO / "configs" / "models"
CFG = derive(
    DENSE, num_experts=4, moe_top_k=2, moe_capacity_factor=2.0, moe_eval_capacity_factor=2.0
)


def with_(cfg: ModelConfig = CFG, **changes) -> ModelConfig:
    return derive(cfg, **changes)


@pytest.fixture(scope="module")
def tp(tensor_parallel: TensorParallel) -> TensorParallel:
    return tensor_parallel


def moe_mlp(cfg: ModelConfig, tp: TensorParallel, ep: ExpertParallel | None = None) -> MoEMLP:
    """One MoE MLP (block 0) with its expert-parallel group, as the engine would set it up."""
    ep = ep or ExpertParallel()
    seed_everything(0)
    mlp = MoEMLP(cfg, tp, ep, 0, RouterStats(cfg.num_experts))
    if ep.size == 1:
        mlp.moe.set_deepspeed_parallelism()
    return mlp


def test_moe_layer_freq_picks_blocks_and_the_flops_count_agrees() -> None:
    cfg = with_(num_layers=5, moe_layer_freq=2)
    assert moe_blocks(cfg) == [True, False, True, False, True]
    assert moe_layer_count(cfg) == 3
    assert moe_blocks(with_(num_experts=0)) == [False, False]
    assert moe_blocks(with_(moe_layer_freq=1)) == [True, True]


def test_every_ep_degree_holds_the_experts_of_ep1_at_their_global_index(
    tp: TensorParallel,
) -> None:
    whole = moe_mlp(CFG, tp).moe.deepspeed_moe
    experts = list(whole.experts.deepspeed_experts)
    assert len(experts) == 4
    # Experts are initialised independently, not copies of one another.
    assert not torch.equal(experts[0].down.weight, experts[1].down.weight)
    for ep in (2, 4):
        for rank in range(ep):
            part = moe_mlp(CFG, tp, ExpertParallel(ep, rank)).moe.deepspeed_moe
            local = list(part.experts.deepspeed_experts)
            assert len(local) == 4 // ep
            for i, expert in enumerate(local):
                want = experts[rank * (4 // ep) + i].state_dict()
                got = expert.state_dict()
                assert got.keys() == want.keys()
                assert all(torch.equal(got[k], want[k]) for k in got)
            assert torch.equal(part.gate.wg.weight, whole.gate.wg.weight)


def test_expert_parallel_rank_follows_deepspeeds_layout() -> None:
    assert [ExpertParallel.of(2, d).rank for d in range(6)] == [0, 1, 0, 1, 0, 1]
    assert ExpertParallel.of(1, 5) == ExpertParallel(1, 0)


def test_expert_parameters_are_marked_for_deepspeed_and_keep_their_tp_attributes(
    tp: TensorParallel,
) -> None:
    from deepspeed.moe.utils import is_moe_param

    mlp = moe_mlp(CFG, tp)
    for name, param in mlp.named_parameters():
        expert = ".experts." in name
        assert is_moe_param(param) == expert, name
        if expert:
            assert param.group_name == "ep_size_1"
            assert param.tensor_model_parallel  # megatron's attribute: counted once per shard


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("factor", [0.25, 0.5, 1.0, 1.25, 2.0, 3.3])
@pytest.mark.parametrize("tokens", [16, 64, 100, 2048])
def test_expert_capacity_is_deepspeeds(top_k: int, factor: float, tokens: int) -> None:
    from deepspeed.moe.sharded_moe import _capacity

    gates = torch.zeros(tokens, 8)
    ds = int(_capacity(gates, torch.tensor(factor * top_k), torch.tensor(4)))
    assert expert_capacity(tokens, 8, factor, top_k, 4) == ds


def route(mlp: MoEMLP, tokens: int = 64, seed: int = 1) -> tuple[torch.Tensor, dict]:
    x = torch.randn(2, tokens // 2, 32, generator=torch.Generator().manual_seed(seed))
    mlp.train()
    out = mlp(x)
    mlp.stats.fold()
    return out, mlp.stats.collect(None)


@pytest.mark.parametrize("top_k", [1, 2])
def test_capacity_drops_exactly_the_overflow(tp: TensorParallel, top_k: int) -> None:
    cfg = with_(moe_top_k=top_k, moe_capacity_factor=0.5, moe_min_capacity=0)
    out, stats = route(moe_mlp(cfg, tp))
    capacity = expert_capacity(64, 4, 0.5, top_k, 0)  # 8 (top-1) or 16 (top-2) slots
    counts = stats["moe_expert_tokens"]
    assert sum(counts) == 64 * top_k  # every token routed to k experts
    overflow = sum(max(0, n - capacity) for n in counts)
    assert overflow > 0
    assert stats["moe_dropped_fraction"] == pytest.approx(overflow / (64 * top_k))
    if top_k == 1:  # a token dropped by its only expert leaves the MLP as zeros
        dropped_rows = (out.reshape(64, 32).abs().sum(-1) == 0).sum().item()
        assert dropped_rows == overflow


def test_no_drop_and_a_large_capacity_drop_nothing_and_agree(tp: TensorParallel) -> None:
    no_drop, stats = route(moe_mlp(with_(moe_drop_tokens=False), tp))
    assert stats["moe_dropped_fraction"] == 0.0
    roomy, roomy_stats = route(moe_mlp(with_(moe_capacity_factor=2.0), tp))  # = experts / k
    assert roomy_stats["moe_dropped_fraction"] == 0.0
    assert roomy_stats["moe_expert_tokens"] == stats["moe_expert_tokens"]
    torch.testing.assert_close(roomy, no_drop, rtol=0, atol=1e-6)
    small, small_stats = route(moe_mlp(with_(moe_capacity_factor=0.5), tp))
    assert small_stats["moe_dropped_fraction"] > 0
    assert not torch.allclose(small, no_drop)


def test_eval_uses_the_eval_capacity_and_records_nothing(tp: TensorParallel) -> None:
    cfg = with_(moe_capacity_factor=0.5, moe_eval_capacity_factor=2.0, moe_min_capacity=0)
    mlp = moe_mlp(cfg, tp)
    x = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(1))
    mlp.eval()
    with torch.no_grad():
        evaluated = mlp(x)
    assert not mlp.stats.aux  # evaluation leaves the step's router numbers alone
    roomy = moe_mlp(with_(cfg, moe_capacity_factor=2.0), tp)
    roomy.train()
    torch.testing.assert_close(evaluated, roomy(x).detach(), rtol=0, atol=1e-6)


def build(cfg: ModelConfig, tp: TensorParallel) -> GPT:
    seed_everything(0)
    model = GPT(cfg, PADDED, tp)
    for module in model.modules():
        if isinstance(module, MoEMLP):
            module.moe.set_deepspeed_parallelism()
    return model


def test_reported_loss_is_the_lm_loss_and_backward_trains_the_router_with_aux(
    tp: TensorParallel,
) -> None:
    window = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(2))
    grads = {}
    for coeff, z in ((0.0, 0.0), (0.5, 0.0), (0.0, 0.5)):
        model = build(with_(moe_aux_loss_coeff=coeff, moe_z_loss_coeff=z), tp)
        loss = model(window)
        loss.backward()
        model.eval()
        with torch.no_grad():
            assert loss.item() == model(window).item()  # exactly the LM loss, no router term
        grads[coeff, z] = model.blocks[0].mlp.moe.deepspeed_moe.gate.wg.weight.grad.clone()
        stats = model.moe_stats.collect(None)
        assert stats["moe_aux_loss"] > 0.5  # ~1 for a balanced router
        assert ("moe_z_loss" in stats) == (z > 0)
    assert not torch.allclose(grads[0.5, 0.0], grads[0.0, 0.0])
    assert not torch.allclose(grads[0.0, 0.5], grads[0.0, 0.0])


def gate_grads(model: GPT) -> list[torch.Tensor]:
    return [b.mlp.moe.deepspeed_moe.gate.wg.weight.grad.clone() for b in model.blocks]


def test_router_losses_enter_backward_in_the_block_scaled_like_the_loss(
    tp: TensorParallel,
) -> None:
    """`RouterLossScaler`: the gradient of loss + 0.5 mean(aux) + 0.1 mean(z) over the MoE
    layers, with the router terms multiplied by `backward_scale` (what the engine multiplies
    the loss by: fp16 loss scale / accumulation steps)."""
    cfg = with_(moe_aux_loss_coeff=0.5, moe_z_loss_coeff=0.1)
    window = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(4))

    # The written-out formula, from the layers' own (undetached) losses; the scaler adds 0.
    model = build(cfg, tp)
    model.moe_stats.backward_scale = 0.0
    taken: list[tuple[torch.Tensor, torch.Tensor]] = []
    for block in model.blocks:
        block.mlp.moe.register_forward_hook(lambda m, args, out: taken.append((args[0], out[1])))
    loss = model(window)
    wgs = [b.mlp.moe.deepspeed_moe.gate.wg.weight for b in model.blocks]
    aux = torch.stack([a for _, a in taken]).mean()
    z = torch.stack(
        [
            torch.logsumexp(F.linear(x.reshape(-1, 32), wg), dim=-1).pow(2).mean()
            for (x, _), wg in zip(taken, wgs, strict=True)
        ]
    ).mean()
    (loss + 0.5 * aux + 0.1 * z).backward()
    want = gate_grads(model)

    for scale in (1.0, 4.0):
        model = build(cfg, tp)
        model.moe_stats.backward_scale = scale
        (scale * model(window)).backward()
        got = gate_grads(model)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, scale * w, rtol=1e-5, atol=1e-7)
    lm_only = build(with_(cfg, moe_aux_loss_coeff=0.0, moe_z_loss_coeff=0.0), tp)
    lm_only(window).backward()
    assert not torch.allclose(gate_grads(lm_only)[0], want[0])  # the router terms do count


def test_recomputed_blocks_give_the_same_gradients_and_are_counted_once(
    tp: TensorParallel,
) -> None:
    window = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(3))
    results = []
    for mode in ("none", "full"):
        model = build(with_(activation_checkpointing=mode, moe_aux_loss_coeff=0.1), tp)
        model(window).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((grads, model.moe_stats.collect(None)))
    (plain, plain_stats), (recomputed, recomputed_stats) = results
    assert all(torch.equal(a, b) for a, b in zip(plain, recomputed, strict=True))
    assert plain_stats == recomputed_stats
    assert sum(plain_stats["moe_expert_tokens"]) == 2 * 16 * 2 * 2  # tokens x top-2 x layers


def test_parameter_count_matches_the_built_moe_model(tp: TensorParallel) -> None:
    for freq in (1, 2):
        cfg = with_(moe_layer_freq=freq)
        model = build(cfg, tp)
        assert parameter_count(cfg, PADDED) == sum(p.numel() for p in model.parameters())
    # Active: top-2 of 4 experts per MoE layer; MFU counts those.
    experts = 3 * 32 * 48
    assert parameter_count(CFG, PADDED) - parameter_count(CFG, PADDED, active=True) == (
        2 * 2 * experts
    )
    dense = with_(num_experts=0)
    assert matmul_params(CFG, PADDED) == matmul_params(dense, PADDED) + 2 * (experts + 32 * 4)
    assert flops_per_token(CFG, 16, PADDED) > flops_per_token(dense, 16, PADDED)


def preset(name: str) -> ModelConfig:
    return ModelConfig(**yaml.safe_load((MODELS / f"{name}.yaml").read_text()))


def test_mixtral_preset_counts_46_7b_total_and_12_9b_active() -> None:
    cfg = preset("mixtral-8x7b")
    padded = cfg.padded_vocab_size(cfg.vocab_size)
    assert padded == 32000
    assert parameter_count(cfg, padded) / 1e9 == pytest.approx(46.70, abs=0.01)
    assert parameter_count(cfg, padded, active=True) / 1e9 == pytest.approx(12.88, abs=0.01)


def test_trillion_parameter_preset_is_about_1t() -> None:
    cfg = preset("moe-1t")
    padded = cfg.padded_vocab_size(cfg.vocab_size)
    total = parameter_count(cfg, padded)
    active = parameter_count(cfg, padded, active=True)
    assert 0.95e12 < total < 1.1e12
    assert active < total / 10
