"""`train.task: sft`: the loss of a global batch is the mean over its response tokens.

An SFT sample is [2, seq_len + 1] (tokens, loss mask; see `scaletrain.data.dataset`). Each
micro-batch's loss is the weighted sum of its label losses (`scaletrain.models.gpt.token_loss`)
with weight mask * micro_batches / mean-over-DP(response tokens of this rank's batch): DeepSpeed
then divides by the micro-batches and averages over DP ranks, which leaves sum / (response
tokens of the global batch), on every layout, and the pipeline path does the same division.
"""

from __future__ import annotations

import torch

from scaletrain.topology.init import Topology


def split_batch(
    batch: torch.Tensor, micro_batch: int, topology: Topology
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(token windows [B, seq + 1], loss weights [B, seq] or None for a pretraining batch)."""
    if batch.dim() == 2:
        return batch, None
    windows, mask = batch[:, 0].contiguous(), batch[:, 1, 1:]
    micro_batches = -(-windows.shape[0] // micro_batch)
    # The mean over DP of each rank's count: the global count / dp, the same on every rank.
    mean_count = topology.mean_over_dp(mask.sum().float())
    scale = micro_batches / mean_count.clamp(min=1.0)
    return windows, (mask.to(scale.device, torch.float32) * scale).contiguous()


def micro_batches(
    windows: torch.Tensor, weights: torch.Tensor | None, micro_batch: int
) -> list[tuple[torch.Tensor, ...]]:
    """The engine's arguments per micro-batch: (window,) or (window, weights)."""
    parts = windows.split(micro_batch)
    if weights is None:
        return [(w,) for w in parts]
    return list(zip(parts, weights.split(micro_batch), strict=True))


def pipeline_pairs(
    windows: torch.Tensor, micro_batch: int, weights: torch.Tensor | None = None
) -> list[tuple]:
    """(inputs, labels) per micro-batch, as a pipeline's first and last stage read them; SFT
    labels are (labels, loss weights)."""
    pairs = []
    for micro in micro_batches(windows, weights, micro_batch):
        labels = micro[0][:, 1:].contiguous()
        pairs.append(
            (micro[0][:, :-1].contiguous(), labels if len(micro) == 1 else (labels, micro[1]))
        )
    return pairs
