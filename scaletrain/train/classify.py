"""`train.task: classify`: its data, its head's spec, and its evaluation (val_accuracy, val_f1).

Training needs nothing of its own in the loop: a sample is [seq_len + 1] (tokens, label), every
micro-batch has micro_batch of them, so the classifier's mean cross-entropy per micro-batch,
averaged by DeepSpeed over micro-batches and DP ranks, is the mean over the global batch.

Evaluation classifies the first min(len(val), eval_batches x global_batch) validation examples,
each once: DP rank r takes examples r, r + dp, ... (padded with repeats of its last one to the
same count on every rank, so collective forward passes under ZeRO-3 stay in step, and the
repeats not counted). The ranks' confusion matrices and loss sums are summed over DP, so
accuracy and macro F1 are those of the whole sample, whatever the layout.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from scaletrain.config.schema import Config
from scaletrain.data.classify import ClassifyDataset, build_classify_dataset
from scaletrain.data.format import DataError
from scaletrain.errors import ConfigError
from scaletrain.models.classifier import ClassifySpec
from scaletrain.topology.init import Topology

TASK = "classify"


def classify_spec(config: Config) -> ClassifySpec | None:
    """The head's labels and pad id from the run's data set (None unless train.task: classify)."""
    if config.train.task != TASK:
        return None
    return ClassifySpec.of_data(config.data.paths[0])


def check_classify_resume(manifest: dict[str, Any], config: Config) -> None:
    """A classifier continues only a classifier's checkpoint, and a language model only a
    language model's: their heads differ (score vs the vocabulary head). One line."""
    saved = ((manifest.get("config") or {}).get("train") or {}).get("task", "pretrain")
    now = config.train.task
    if (saved == TASK) != (now == TASK):
        raise ConfigError(
            "checkpoint.resume",
            f"the checkpoint was saved by train.task {saved}, this run is {now}: a classifier's "
            "head is not a language model's; start a classifier from a language model with "
            "model.init_from=hf:<its `scaletrain export hf` folder>, or use "
            "checkpoint.resume=none or a new train.run_dir",
        )


def classify_dataset(config: Config, split: str) -> ClassifyDataset:
    """The split's (tokens, label) samples; the trainer asks for "val" only when it evaluates."""
    dataset = build_classify_dataset(list(config.data.paths), split, config.train.seq_len)
    if len(dataset) == 0:
        raise DataError(
            f"split {split!r} of {config.data.paths[0]!r} has no examples; prepare it with a "
            "larger --val-fraction or set train.eval_interval=0"
            if split == "val"
            else f"split {split!r} of {config.data.paths[0]!r} has no examples"
        )
    return dataset


def macro_f1(confusion: np.ndarray) -> float:
    """The unweighted mean F1 over the labels that occur as truth or prediction (scikit-learn's
    `f1_score(average="macro")`; a label with no true positive scores 0)."""
    tp = np.diag(confusion).astype(np.float64)
    truth, predicted = confusion.sum(1), confusion.sum(0)
    present = (truth + predicted) > 0
    denominator = truth + predicted
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return float(f1[present].mean()) if present.any() else 0.0


@torch.no_grad()
def evaluate_classifier(
    engine, dataset: ClassifyDataset, config: Config, global_batch: int, topology: Topology
) -> dict[str, float]:
    """val_loss (mean cross-entropy), val_accuracy and val_f1 over the evaluation sample."""
    count = min(len(dataset), config.train.eval_batches * global_batch)
    dp, rank = topology.dims.dp, topology.dp_rank
    mine = np.arange(rank, count, dp)
    per_rank = -(-count // dp)
    padded = np.concatenate([mine, np.full(per_rank - len(mine), mine[-1] if len(mine) else 0)])
    num_labels = len(dataset.label_names)
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.float64)
    loss_sum = torch.zeros((), dtype=torch.float64)
    micro = config.train.micro_batch
    for start in range(0, per_rank, micro):
        take = padded[start : start + micro]
        real = min(len(take), max(len(mine) - start, 0))
        window = torch.from_numpy(np.stack([dataset[int(i)] for i in take])).to(topology.device)
        logits = engine(window, return_logits=True).float().cpu()
        labels = window[:real, -1].cpu()
        logits = logits[:real]
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        flat = labels * num_labels + logits.argmax(-1)
        confusion += torch.bincount(flat, minlength=num_labels**2).view_as(confusion).double()
    totals = torch.cat([confusion.flatten(), loss_sum.view(1)]).to(topology.device)
    if dp > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=topology.groups.dp)
    totals = totals.cpu()
    confusion_np = totals[:-1].view(num_labels, num_labels).numpy()
    return {
        "val_loss": float(totals[-1]) / count,
        "val_accuracy": float(np.trace(confusion_np) / count),
        "val_f1": macro_f1(confusion_np),
    }
