"""The Llama-style decoder-only language model: embedding, blocks, norm, head, loss."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from scaletrain.config.schema import ModelConfig
from scaletrain.models.layers import DecoderBlock, Rotary
from scaletrain.models.parallel import TensorParallel


class GPT(nn.Module):
    """Takes [batch, seq + 1] token windows; returns the mean next-token loss."""

    def __init__(self, cfg: ModelConfig, padded_vocab_size: int, tp: TensorParallel) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp = tp
        self.embedding = tp.embedding(padded_vocab_size, cfg.hidden_size, std=cfg.init_std)
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.blocks = nn.ModuleList(DecoderBlock(cfg, tp) for _ in range(cfg.num_layers))
        self.recomputed = recomputed_blocks(cfg)
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        if cfg.tie_embeddings:
            self.head = tp.tied_column(cfg.hidden_size, padded_vocab_size)
        else:
            self.head = tp.column(cfg.hidden_size, padded_vocab_size, std=cfg.init_std)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """This TP rank's slice of the vocabulary logits, [batch, seq, vocab / tp]."""
        x = self.embedding(tokens)
        training = self.training and torch.is_grad_enabled()  # eval keeps nothing anyway
        for block, recomputed in zip(self.blocks, self.recomputed, strict=True):
            if training and recomputed:
                # Non-reentrant: the replay runs the same TP collectives on every rank and,
                # with no dropout, gives bit-identical activations and gradients.
                x = checkpoint(block, x, self.rotary, use_reentrant=False)
            else:
                x = block(x, self.rotary)
        x = self.norm(x)
        weight = self.embedding.weight if self.cfg.tie_embeddings else None
        logits, _ = self.head(x, weight=weight)
        return logits

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        inputs, labels = window[:, :-1], window[:, 1:]
        return self.tp.cross_entropy(self.logits(inputs), labels).mean()


def recomputed_blocks(cfg: ModelConfig) -> list[bool]:
    """Which decoder blocks drop their activations after forward and recompute them in backward.

    `model.activation_checkpointing`: none keeps everything, full recomputes every block,
    every_n recomputes blocks 0, n, 2n, ... (n = activation_checkpointing_every).
    """
    mode, every = cfg.activation_checkpointing, cfg.activation_checkpointing_every
    return [mode == "full" or (mode == "every_n" and i % every == 0) for i in range(cfg.num_layers)]
