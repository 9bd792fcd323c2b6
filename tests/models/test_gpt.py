"""The model on one rank: shapes, causality, parameter and FLOP counts, tied weights."""

from __future__ import annotations

import torch

from scaletrain.config.schema import ModelConfig
from scaletrain.models.gpt import GPT
from scaletrain.models.parallel import TensorParallel
from scaletrain.plan.flops import flops_per_token, matmul_params, parameter_count
from scaletrain.topology.init import seed_everything
from tests.models.tiny import DENSE, PADDED, derive

CFG = DENSE


def build(cfg: ModelConfig, tp: TensorParallel, seed: int = 0) -> GPT:
    seed_everything(seed)
    return GPT(cfg, PADDED, tp)


def test_padded_vocab_is_independent_of_tp() -> None:
    assert CFG.padded_vocab_size(100) == 128
    assert CFG.padded_vocab_size(128) == 128
    assert CFG.padded_vocab_size(129) == 192


def test_parameter_count_matches_the_built_model(tensor_parallel: TensorParallel) -> None:
    for tied in (False, True):
        cfg = derive(CFG, tie_embeddings=tied)
        model = build(cfg, tensor_parallel)
        assert parameter_count(cfg, PADDED) == sum(p.numel() for p in model.parameters())


def test_flops_per_token_by_hand() -> None:
    # qkv 32*(4+2*2)*8=2048, out 32*32=1024, mlp 3*32*48=4608 per layer; head 32*128.
    assert matmul_params(CFG, PADDED) == 2 * (2048 + 1024 + 4608) + 32 * 128
    attention = 2 * 2 * 2 * 16 * 4 * 8
    assert flops_per_token(CFG, 16, PADDED) == 3 * (2 * (2 * 7680 + 4096) + attention)


def test_logits_shape_and_causality(tensor_parallel: TensorParallel) -> None:
    model = build(CFG, tensor_parallel)
    tokens = torch.randint(0, 100, (2, 12))
    logits = model.logits(tokens)
    assert logits.shape == (2, 12, PADDED)
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 100
    later = model.logits(changed)
    assert torch.equal(logits[:, :8], later[:, :8])
    assert not torch.allclose(logits[:, 8:], later[:, 8:])


def test_initial_loss_is_near_uniform(tensor_parallel: TensorParallel) -> None:
    """Small init gives ~uniform predictions: loss close to ln(padded vocab)."""
    model = build(CFG, tensor_parallel)
    loss = model(torch.randint(0, 100, (4, 17)))
    assert abs(loss.item() - torch.log(torch.tensor(float(PADDED))).item()) < 0.1


def test_same_seed_same_weights(tensor_parallel: TensorParallel) -> None:
    a, b = build(CFG, tensor_parallel, seed=3), build(CFG, tensor_parallel, seed=3)
    c = build(CFG, tensor_parallel, seed=4)
    pairs = list(zip(a.parameters(), b.parameters(), c.parameters(), strict=True))
    assert all(torch.equal(pa, pb) for pa, pb, _ in pairs)
    assert not torch.equal(a.embedding.weight, c.embedding.weight)


def test_tied_head_uses_the_embedding(tensor_parallel: TensorParallel) -> None:
    cfg = derive(CFG, tie_embeddings=True)
    model = build(cfg, tensor_parallel)
    assert not [name for name in dict(model.named_parameters()) if name.startswith("head.")]
    tokens = torch.tensor([[5, 7, 9]])
    hidden = model.embedding(tokens)
    for block in model.blocks:
        hidden = block(hidden)
    expected = model.norm(hidden) @ model.embedding.weight.T
    torch.testing.assert_close(model.logits(tokens), expected)
