"""Pipeline parallelism: the GPT's layers as a DeepSpeed `PipelineModule`.

The stages are cut from the model's one layer list (`scaletrain.models.gpt.model_layers`:
embedding, decoder blocks, final norm, vocabulary head). Each layer is built under the same
per-layer seed as in `GPT`, so a stage that builds only its own layers holds exactly the
weights of the whole model.
A tied head is a `TiedLayerSpec` of the embedding on the last stage; DeepSpeed keeps the two
copies equal by broadcasting at start and all-reducing their gradients.

DeepSpeed runs the 1F1B schedule over the step's micro-batches (`engine.train_batch`): the
first stage reads the tokens, the last the labels, and the loss is computed there.
MoE blocks train their routers inside their own backward (`scaletrain.models.moe.
RouterLossScaler`): only the activations and their gradients cross stage boundaries, and a
stage's `moe_stats` hold its own blocks' router numbers (the trainer sums them over stages).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from scaletrain.config.schema import ModelConfig
from scaletrain.models.gpt import LayerSeeds, VocabHead, model_layers, token_loss
from scaletrain.models.layers import DecoderBlock
from scaletrain.models.moe import ExpertParallel, RouterStats
from scaletrain.models.parallel import TensorParallel
from scaletrain.plan.flops import parameter_count
from scaletrain.topology.dims import ParallelDims

TIED_KEY = "embedding"

# `pipeline_partition` -> DeepSpeed's partition method. "uniform" balances decoder blocks
# (the embedding joins the first stage, the head the last); "parameters" balances weights.
PARTITION_METHODS = {"uniform": f"type:{DecoderBlock.__name__}", "parameters": "parameters"}


class _SeededBuild:
    """What both specs build: `factory()` under the seed of layer `index`."""

    seeds: LayerSeeds
    index: int | None
    factory: Callable[[], nn.Module]

    def build(self, log: bool = False) -> nn.Module:
        with self.seeds(self.index):
            return self.factory()


class SeededSpec(_SeededBuild, LayerSpec):
    """A layer that a stage builds with `factory` under the layer's own seed."""

    def __init__(
        self, seeds: LayerSeeds, index: int | None, typename: type, factory: Callable
    ) -> None:
        super().__init__(typename)
        self.seeds, self.index, self.factory = seeds, index, factory


class SeededTiedSpec(_SeededBuild, TiedLayerSpec):
    """A tied layer (one module on every stage that uses it) built under its own seed."""

    def __init__(
        self,
        seeds: LayerSeeds,
        index: int | None,
        typename: type,
        factory: Callable,
        forward_fn: Callable | None = None,
    ) -> None:
        super().__init__(TIED_KEY, typename, forward_fn=forward_fn, tied_weight_attr=["weight"])
        self.seeds, self.index, self.factory = seeds, index, factory


class GPTPipeline(PipelineModule):
    """A PipelineModule that balances "parameters" from counted weights instead of building
    every layer on every rank (DeepSpeed's way, which costs the whole model's memory), and
    folds its MoE blocks' router numbers once per micro-batch."""

    def __init__(
        self,
        layers: list,
        layer_weights: list[int],
        moe_stats: RouterStats | None = None,
        **kwargs,
    ) -> None:
        object.__setattr__(self, "_layer_weights", layer_weights)  # read during super().__init__
        super().__init__(layers, **kwargs)
        self.moe_stats = moe_stats

    def _count_layer_params(self) -> list[int]:
        return list(self._layer_weights)

    def forward(self, forward_input):
        out = super().forward(forward_input)
        if self.moe_stats is not None and self.training:
            self.moe_stats.fold()
        return out


def pipeline_model(
    cfg: ModelConfig,
    padded_vocab_size: int,
    tp: TensorParallel,
    dims: ParallelDims,
    partition: str,
    ep: ExpertParallel | None = None,
) -> GPTPipeline:
    """This rank's stage of the GPT; the ranks are laid out as in `ParallelDims` (pp, dp, tp)."""
    seeds = LayerSeeds()
    layers: list = []
    embedding = None
    stats = RouterStats.of(cfg) if cfg.num_experts else None
    for layer in model_layers(cfg, padded_vocab_size, tp, ep, stats):
        if cfg.tie_embeddings and layer.name == "embedding":
            embedding = layer
            layers.append(SeededTiedSpec(seeds, layer.seed, layer.typename, layer.build))
        elif cfg.tie_embeddings and layer.name == "head":
            # Weightless: it projects with the tied embedding's weight on the last stage.
            assert embedding is not None
            project = functools.partial(_tied_logits, layer.build())
            layers.append(
                SeededTiedSpec(seeds, embedding.seed, embedding.typename, embedding.build, project)
            )
        else:
            layers.append(SeededSpec(seeds, layer.seed, layer.typename, layer.build))
    return GPTPipeline(
        layers,
        layer_weights(cfg, padded_vocab_size),
        stats,
        topology=PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp),
        loss_fn=functools.partial(_loss, tp),
        partition_method=PARTITION_METHODS[partition],
    )


def layer_weights(cfg: ModelConfig, padded_vocab_size: int) -> list[int]:
    """Weights per pipeline layer: embedding, blocks, norm, head (a tied head counts its
    matmul: it costs the last stage as much as an own head would)."""
    embedding = padded_vocab_size * cfg.hidden_size
    head = 0 if cfg.tie_embeddings else embedding
    blocks = parameter_count(cfg, padded_vocab_size) - embedding - head - cfg.hidden_size
    return [embedding, *[blocks // cfg.num_layers] * cfg.num_layers, cfg.hidden_size, embedding]


def _tied_logits(head: VocabHead, embedding: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return head(x, embedding.weight)


def _loss(
    tp: TensorParallel,
    logits: torch.Tensor,
    labels: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """The last stage's loss; SFT labels come as (labels, loss weights), see `token_loss`."""
    weights = None
    if isinstance(labels, (tuple, list)):
        labels, weights = labels
    return token_loss(tp.cross_entropy(logits, labels), weights)
