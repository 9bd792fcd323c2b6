"""The split plan is the one statement of how each weight is split and named in Hugging Face:
it names every parameter of the model, agrees with the split megatron-core gave it, and its
HF mapping is a bijection (to HF and back gives the same tensor)."""

from __future__ import annotations

import pytest
import torch

from scaletrain.config.schema import ModelConfig
from scaletrain.errors import ScaletrainError
from scaletrain.models.gpt import GPT, model_layers
from scaletrain.models.parallel import TensorParallel
from scaletrain.models.registry import (
    build_model,
    family_of,
    family_of_hf,
    pipeline_layer_names,
    saved_split_plan,
)
from scaletrain.models.split_plan import Split, check_saved_split, from_hf, to_hf
from scaletrain.topology.dims import ParallelDims
from scaletrain.topology.init import seed_everything
from tests.models.tiny import DENSE, derive

CFG = DENSE
MOE = derive(CFG, num_experts=4)


@pytest.mark.parametrize(
    ("cfg", "family"),
    [
        (CFG, "llama"),
        (derive(CFG, tie_embeddings=True), "llama"),
        (MOE, "mixtral"),
    ],
)
def test_plan_names_every_parameter_with_megatron_cores_split(
    tensor_parallel: TensorParallel, cfg: ModelConfig, family: str
) -> None:
    seed_everything(0)
    model = GPT(cfg, 128, tensor_parallel)
    plan = family_of(cfg).split_plan(cfg)
    assert family_of(cfg).hf_config(cfg)["model_type"] == family
    hf_names = set()
    for name, param in model.named_parameters():
        split = getattr(param, "tensor_model_parallel", False)
        dim = int(param.partition_dim) if split else None
        stride = int(param.partition_stride) if split else None
        check_saved_split(plan, name, dim, stride)  # raises on any disagreement
        weight, index = plan.find(name)
        hf_names.update(weight.hf_names(**index))
    # Every HF weight is named once: per block 2 norms + q, k, v, o, then gate, up, down
    # (dense) or the router + w1, w3, w2 per expert (MoE).
    per_block = 6 + (1 + 3 * cfg.num_experts if cfg.num_experts else 3)
    assert len(hf_names) == 2 + (not cfg.tie_embeddings) + per_block * cfg.num_layers
    plan_names = [name for name, _, _ in plan.expand(cfg.num_layers, cfg.num_experts)]
    assert sorted(plan_names) == sorted(n for n, _ in model.named_parameters())


def test_the_pipeline_layer_names_are_the_layer_lists(tensor_parallel: TensorParallel) -> None:
    layers = model_layers(MOE, 128, tensor_parallel)
    assert [layer.name for layer in layers] == pipeline_layer_names(MOE)
    assert [layer.seed for layer in layers] == [0, 1, 2, None, 3]


def test_a_saved_split_that_disagrees_is_one_line() -> None:
    plan = saved_split_plan({"config": {"model": CFG.__dict__}})
    with pytest.raises(ScaletrainError, match=r"^blocks.0.attn.out.weight: saved split over TP"):
        check_saved_split(plan, "blocks.0.attn.out.weight", 0, 1)
    assert plan.split_of("blocks.1.mlp.gate_up.weight") is Split.GATE_UP
    assert (Split.GATE_UP.tp_dim, Split.GATE_UP.tp_stride) == (0, 2)


def test_qkv_goes_to_hf_per_kv_group_and_back() -> None:
    g, d, hidden = 2, CFG.head_dim, CFG.hidden_size
    # Row r of the fused weight holds the number r: group k is [q_2k, q_2k+1, k_k, v_k].
    full = torch.arange(CFG.kv_heads * (g + 2) * d, dtype=torch.float32)[:, None].repeat(1, hidden)
    q, k, v = to_hf(Split.QKV, full, CFG, 3)
    assert q.shape == (CFG.num_heads * d, hidden) and k.shape == v.shape == (
        CFG.kv_heads * d,
        hidden,
    )
    assert q[d, 0] == d and q[2 * d, 0] == (g + 2) * d  # head 2 opens the second kv group
    assert k[0, 0] == g * d and v[d, 0] == (g + 2) * d + (g + 1) * d
    assert torch.equal(from_hf(Split.QKV, [q, k, v], CFG, 128), full)
    gate_up = torch.randn(2 * 48, hidden)
    assert torch.equal(
        from_hf(Split.GATE_UP, to_hf(Split.GATE_UP, gate_up, CFG, 2), CFG, 128), gate_up
    )
    embedding = torch.randn(128, hidden)
    (rows,) = to_hf(Split.VOCAB, embedding, CFG, 1)
    assert rows.shape == (100, hidden)
    back = from_hf(Split.VOCAB, [rows], CFG, 128)
    assert torch.equal(back[:100], embedding[:100]) and not back[100:].any()


def test_registry_builds_the_model_and_refuses_unknown_architectures(
    tensor_parallel: TensorParallel,
) -> None:
    seed_everything(3)
    built = build_model(CFG, 128, tensor_parallel, ParallelDims(tp=1, pp=1, dp=1), None, "uniform")
    seed_everything(3)
    direct = GPT(CFG, 128, tensor_parallel)
    for (n1, p1), (n2, p2) in zip(built.named_parameters(), direct.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    assert family_of_hf("MixtralForCausalLM", "x").name == "mixtral"
    with pytest.raises(ScaletrainError, match=r"^x: architecture GPT2LMHeadModel is not supported"):
        family_of_hf("GPT2LMHeadModel", "x")
