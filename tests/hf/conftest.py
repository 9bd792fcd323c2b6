"""Helpers for the Hugging Face tests: scaletrain's own logits of a set of full weights (the
model a TP=1 rank builds, loaded with them). The world of one is tests/conftest.py's."""

from __future__ import annotations

import torch

from scaletrain.config.schema import ModelConfig
from scaletrain.models.gpt import GPT
from scaletrain.models.parallel import TensorParallel


def scaletrain_logits(
    weights: dict[str, torch.Tensor], cfg: ModelConfig, tp: TensorParallel, tokens: torch.Tensor
) -> torch.Tensor:
    """Our model's logits over the real vocabulary (padding rows dropped), in eval mode."""
    padded = weights["embedding.weight"].shape[0]
    model = GPT(cfg, padded, tp).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(m.endswith("_extra_state") for m in missing)
    with torch.no_grad():
        return model.logits(tokens)[..., : cfg.vocab_size]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()
