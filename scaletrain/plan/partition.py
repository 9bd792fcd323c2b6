"""`pipeline_partition: parameters` without DeepSpeed: which blocks each pipeline stage gets.

The layer weights are those `scaletrain.models.pipeline.layer_weights` hands DeepSpeed
(embedding, blocks, final norm, head), and the split is DeepSpeed's `partition_balanced`
(the linear-partition dynamic program that minimises max - min stage weight), written again
here because the planner must not import DeepSpeed.
"""

from __future__ import annotations

import functools

from scaletrain.config.schema import ModelConfig
from scaletrain.plan.flops import parameter_count


def layer_weights(cfg: ModelConfig, padded_vocab_size: int) -> list[int]:
    """Embedding, each block, final norm, head (a tied head counts its matmul)."""
    embedding = padded_vocab_size * cfg.hidden_size
    head = 0 if cfg.tie_embeddings else embedding
    blocks = parameter_count(cfg, padded_vocab_size) - embedding - head - cfg.hidden_size
    return [embedding, *[blocks // cfg.num_layers] * cfg.num_layers, cfg.hidden_size, embedding]


@functools.cache
def partition_balanced(weights: tuple[int, ...], parts: int) -> list[int]:
    """Boundaries [0, ..., n] of `parts` contiguous groups, as DeepSpeed computes them."""
    n = len(weights)
    if n <= parts:
        return [min(p, n) for p in range(parts + 1)]
    inf = float("inf")
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    dp_max = [[inf] * (parts + 1) for _ in range(n + 1)]
    dp_min = [[inf] * (parts + 1) for _ in range(n + 1)]
    dp_cost = [[inf] * (parts + 1) for _ in range(n + 1)]
    position = [[0] * (parts + 1) for _ in range(n + 1)]
    dp_max[0][0] = dp_cost[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, min(i, parts) + 1):
            for k in range(i):
                chunk = prefix[i] - prefix[k]
                high, low = max(dp_max[k][j - 1], chunk), min(dp_min[k][j - 1], chunk)
                if dp_cost[i][j] >= high - low:
                    dp_cost[i][j], dp_max[i][j], dp_min[i][j] = high - low, high, low
                    position[i][j] = k
    bounds = [n]
    for j in reversed(range(1, parts + 1)):
        bounds.append(position[bounds[-1]][j])
    return bounds[::-1]


def balanced_blocks(cfg: ModelConfig, padded_vocab_size: int, pp: int) -> list[range]:
    """Decoder blocks per stage (layer 0 is the embedding, 1..L the blocks)."""
    bounds = partition_balanced(tuple(layer_weights(cfg, padded_vocab_size)), pp)
    clip = lambda layer: min(max(layer - 1, 0), cfg.num_layers)  # noqa: E731
    return [range(clip(bounds[s]), clip(bounds[s + 1])) for s in range(pp)]
