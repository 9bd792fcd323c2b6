"""The sequence classifier: the decoder of `scaletrain.models.gpt` with a `score` head on the
last real token, as transformers' `LlamaForSequenceClassification` computes it.

A sample is [seq_len + 1]: the tokens, right-padded with `pad_id`, then the label id. The
classified position is the last one whose token is not `pad_id` (HF: `(arange * (ids != pad))
.argmax(-1)`); the loss is the mean cross-entropy over the micro-batch, which every layout
turns into the mean over the global batch (micro-batches are all of one size). The trunk's
layers are built under the same per-layer seeds as the language model's, so a classifier and
a GPT from one seed share their decoder; the score weight has a seed index of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.config.schema import ModelConfig
from scaletrain.models.gpt import LayerSeeds, head_index, model_layers
from scaletrain.models.moe import ExpertParallel, RouterStats
from scaletrain.models.parallel import TensorParallel


@dataclass(frozen=True)
class ClassifySpec:
    """What the head needs from the data: how many labels (and their names), the pad id."""

    labels: tuple[str, ...]
    pad_id: int

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @classmethod
    def of_data(cls, path: str) -> ClassifySpec:
        from scaletrain.data.format import read_metadata

        info = read_metadata(path)
        return cls(tuple(info.labels), info.eos_id)


def score_index(cfg: ModelConfig) -> int:
    """The score weight's seed index: after every layer of the language model's list."""
    return head_index(cfg) + 1


def last_real_positions(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """[batch] index of the last token that is not the pad (0 for an all-pad row, as HF)."""
    positions = torch.arange(tokens.shape[-1], device=tokens.device)
    return (positions * (tokens != pad_id)).argmax(-1)


class Score(nn.Linear):
    """hidden -> label logits, no bias, normal(0, std) weights. Initialised inside __init__:
    under ZeRO-3's `zero.Init` a parameter is partitioned as its module's __init__ returns, so
    an init applied afterwards would touch an empty placeholder."""

    def __init__(self, hidden_size: int, num_labels: int, std: float) -> None:
        self.std = std
        super().__init__(hidden_size, num_labels, bias=False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.std)


class Classifier(nn.Module):
    """Takes [batch, seq + 1] (tokens, label); returns the mean cross-entropy over labels."""

    def __init__(
        self,
        cfg: ModelConfig,
        padded_vocab_size: int,
        tp: TensorParallel,
        spec: ClassifySpec,
        ep: ExpertParallel | None = None,
    ) -> None:
        super().__init__()
        self.cfg, self.tp, self.pad_id = cfg, tp, spec.pad_id
        seeds = LayerSeeds()
        self.moe_stats = RouterStats.of(cfg) if cfg.num_experts else None
        built = {}
        for layer in model_layers(cfg, padded_vocab_size, tp, ep, self.moe_stats):
            if layer.name == "head":  # no vocabulary head, as in HF's classifier
                continue
            with seeds(layer.seed):
                built[layer.name] = layer.build()
        self.embedding = built["embedding"]
        self.blocks = nn.ModuleList(built[f"blocks.{i}"] for i in range(cfg.num_layers))
        self.norm = built["norm"]
        with seeds(score_index(cfg)):
            self.score = Score(cfg.hidden_size, spec.num_labels, cfg.init_std)

    def scores(self, tokens: torch.Tensor) -> torch.Tensor:
        """[batch, num_labels] logits at each row's last real token."""
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x)
        last = last_real_positions(tokens, self.pad_id)
        # The norm works per position: normalising only the classified ones is the same.
        hidden = self.norm(x[torch.arange(tokens.shape[0], device=tokens.device), last])
        return self.score(hidden)

    def forward(self, window: torch.Tensor, return_logits: bool = False) -> torch.Tensor:
        """The mean cross-entropy of the labels; with `return_logits` (evaluation) the
        [batch, num_labels] logits instead, through the engine like any forward (ZeRO-3)."""
        logits = self.scores(window[:, :-1])
        if return_logits:
            return logits
        loss = F.cross_entropy(logits.float(), window[:, -1])
        if self.moe_stats is not None and self.training:
            self.moe_stats.fold()
        return loss
