"""The pipeline's layer list is the GPT written out flat: same weights, same loss.

On one rank a single-stage PipelineModule holds every layer, so it can be compared with the
whole model parameter by parameter; the multi-stage runs are in tests/train/test_pipeline.py.
"""

from __future__ import annotations

import pytest
import torch

from scaletrain.models.gpt import GPT
from scaletrain.models.parallel import TensorParallel
from scaletrain.models.pipeline import layer_weights, pipeline_model
from scaletrain.plan.flops import parameter_count
from scaletrain.topology.dims import ParallelDims
from scaletrain.topology.init import seed_everything
from tests.models.tiny import DENSE, PADDED, derive

CFG = derive(DENSE, num_layers=3)
ONE = ParallelDims(tp=1, pp=1, dp=1)


@pytest.mark.parametrize("tied", [False, True])
def test_one_stage_pipeline_is_the_gpt(tensor_parallel: TensorParallel, tied: bool) -> None:
    cfg = derive(CFG, tie_embeddings=tied)
    seed_everything(11)
    gpt = GPT(cfg, PADDED, tensor_parallel)
    seed_everything(11)
    pipe = pipeline_model(cfg, PADDED, tensor_parallel, ONE, "uniform")
    gpt_params = [p for _, p in gpt.named_parameters()]
    pipe_params = [p for _, p in pipe.named_parameters()]
    assert len(gpt_params) == len(pipe_params)
    # Same tensors in the same order (the tied embedding is registered under tied_modules).
    by_shape = sorted(gpt_params, key=lambda p: (tuple(p.shape), p.sum().item()))
    pipe_sorted = sorted(pipe_params, key=lambda p: (tuple(p.shape), p.sum().item()))
    for a, b in zip(by_shape, pipe_sorted, strict=True):
        assert torch.equal(a, b)
    window = torch.randint(0, 100, (2, 9))
    inputs, labels = window[:, :-1], window[:, 1:]
    assert torch.equal(pipe.loss_fn(pipe(inputs), labels), gpt(window))


def test_layer_weights_add_up(tensor_parallel: TensorParallel) -> None:
    weights = layer_weights(CFG, PADDED)
    assert len(weights) == CFG.num_layers + 3  # embedding, blocks, norm, head
    assert sum(weights) == parameter_count(CFG, PADDED)
    seed_everything(0)
    gpt = GPT(CFG, PADDED, tensor_parallel)
    assert weights[1] == sum(p.numel() for p in gpt.blocks[0].parameters())
