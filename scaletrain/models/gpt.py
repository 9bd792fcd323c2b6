"""The Llama-style decoder-only language model: embedding, blocks, norm, head, loss.

The model is one list of layers (`model_layers`: embedding, decoder blocks, final norm,
vocabulary head), each initialised from its own seed derived from the global one, so that a
pipeline stage that builds only some of the layers gets exactly the weights the whole model
has (`scaletrain.models.pipeline` partitions the same list).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel import VocabParallelEmbedding
from torch import nn

from scaletrain.config.schema import ModelConfig
from scaletrain.models.layers import DecoderBlock
from scaletrain.models.moe import ExpertParallel, MoEMLP, RouterStats, moe_blocks
from scaletrain.models.parallel import TensorParallel, seeded_rng


class LayerSeeds:
    """Seeds the global RNG per layer index, derived from the seed the run set before."""

    def __init__(self) -> None:
        self.base = torch.initial_seed()

    def __call__(self, index: int | None) -> contextlib.AbstractContextManager[None]:
        if index is None:  # a layer without random initialisation (the norms)
            return contextlib.nullcontext()
        return seeded_rng(self.base * 1_000_003 + index)


@dataclass(frozen=True)
class Layer:
    """One entry of the model's layer list: what the whole model and a pipeline stage build."""

    name: str
    """Where the whole model keeps it: embedding, blocks.<i>, norm, head."""
    seed: int | None
    """The per-layer seed index it is built under (None: nothing random in it)."""
    typename: type
    build: Callable[[], nn.Module]


class VocabHead(nn.Module):
    """hidden -> this TP rank's slice of the vocabulary logits, [batch, seq, vocab / tp].

    A tied head has no weight of its own; it is handed the embedding's at call time.
    """

    def __init__(self, cfg: ModelConfig, padded_vocab_size: int, tp: TensorParallel) -> None:
        super().__init__()
        if cfg.tie_embeddings:
            self.proj = tp.tied_column(cfg.hidden_size, padded_vocab_size)
        else:
            self.proj = tp.column(cfg.hidden_size, padded_vocab_size, std=cfg.init_std)

    def forward(self, x: torch.Tensor, tied_weight: torch.Tensor | None = None) -> torch.Tensor:
        logits, _ = self.proj(x, weight=tied_weight)
        return logits


class GPT(nn.Module):
    """Takes [batch, seq + 1] token windows; returns the mean next-token loss."""

    def __init__(
        self,
        cfg: ModelConfig,
        padded_vocab_size: int,
        tp: TensorParallel,
        ep: ExpertParallel | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp = tp
        seeds = LayerSeeds()
        # MoE: the router's numbers of every MoE block; the trainer collects them per step.
        self.moe_stats = RouterStats.of(cfg) if cfg.num_experts else None
        built = {}
        for layer in model_layers(cfg, padded_vocab_size, tp, ep, self.moe_stats):
            with seeds(layer.seed):
                built[layer.name] = layer.build()
        # Registered in this order: the parameter order is the checkpoints' flat ZeRO layout.
        self.embedding = built["embedding"]
        self.blocks = nn.ModuleList(built[f"blocks.{i}"] for i in range(cfg.num_layers))
        self.norm, self.head = built["norm"], built["head"]

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """This TP rank's slice of the vocabulary logits, [batch, seq, vocab / tp]."""
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x)
        tied = self.embedding.weight if self.cfg.tie_embeddings else None
        return self.head(self.norm(x), tied)

    def forward(
        self, window: torch.Tensor, loss_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The LM loss only: the router losses enter backward inside each MoE block
        (`RouterLossScaler`), so the loss reported (and compared across layouts) is the LM's.

        loss_weights ([batch, seq], `train.task: sft`): weigh each label's loss (see
        `token_loss`) instead of taking the mean over all of them."""
        inputs, labels = window[:, :-1], window[:, 1:]
        loss = token_loss(self.tp.cross_entropy(self.logits(inputs), labels), loss_weights)
        if self.moe_stats is not None and self.training:
            self.moe_stats.fold()
        return loss


def token_loss(per_token: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The mean of the per-label losses, or their weighted sum.

    SFT weights are the loss mask scaled by the trainer (`scaletrain.train.sft`) so that
    DeepSpeed's mean over micro-batches and data-parallel ranks comes out as the mean over the
    response tokens of the whole global batch; masked labels weigh exactly 0 (no gradient)."""
    if weights is None:
        return per_token.mean()
    return (per_token * weights).sum()


def model_layers(
    cfg: ModelConfig,
    padded_vocab_size: int,
    tp: TensorParallel,
    ep: ExpertParallel | None = None,
    stats: RouterStats | None = None,
) -> list[Layer]:
    """The model as one flat list: embedding, decoder blocks, final norm, vocabulary head.

    `GPT` builds all of it; `scaletrain.models.pipeline` hands the same list to DeepSpeed's
    stages. Each layer is built under its own seed, so both hold the same weights.
    """
    embed = functools.partial(tp.embedding, padded_vocab_size, cfg.hidden_size, cfg.init_std)
    layers = [Layer("embedding", embedding_index(), VocabParallelEmbedding, embed)]
    layout = zip(recomputed_blocks(cfg), moe_blocks(cfg), strict=True)
    for i, (recompute, moe) in enumerate(layout):
        build = functools.partial(_block, cfg, tp, recompute, moe, ep, i, stats)
        layers.append(Layer(f"blocks.{i}", block_index(i), DecoderBlock, build))
    norm = functools.partial(nn.RMSNorm, cfg.hidden_size, eps=cfg.norm_eps)
    layers.append(Layer("norm", None, nn.RMSNorm, norm))
    head = functools.partial(VocabHead, cfg, padded_vocab_size, tp)
    layers.append(Layer("head", head_index(cfg), VocabHead, head))
    return layers


def _block(
    cfg: ModelConfig,
    tp: TensorParallel,
    recompute: bool,
    moe: bool,
    ep: ExpertParallel | None,
    index: int,
    stats: RouterStats | None,
) -> DecoderBlock:
    """Decoder block `index`; an MoE block's MLP is built first, under the block's seed."""
    mlp = None
    if moe:
        assert stats is not None, "an MoE block reports to the model's RouterStats"
        mlp = MoEMLP(cfg, tp, ep or ExpertParallel(), index, stats)
    return DecoderBlock(cfg, tp, recompute, mlp)


def embedding_index() -> int:
    return 0


def block_index(block: int) -> int:
    return 1 + block


def head_index(cfg: ModelConfig) -> int:
    return 1 + cfg.num_layers


def recomputed_blocks(cfg: ModelConfig) -> list[bool]:
    """Which decoder blocks drop their activations after forward and recompute them in backward.

    `model.activation_checkpointing`: none keeps everything, full recomputes every block,
    every_n recomputes blocks 0, n, 2n, ... (n = activation_checkpointing_every).
    """
    mode, every = cfg.activation_checkpointing, cfg.activation_checkpointing_every
    return [mode == "full" or (mode == "every_n" and i % every == 0) for i in range(cfg.num_layers)]
