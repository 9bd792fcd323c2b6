"""`train.task: sft` through the trainer: the reported loss is the mean over the response tokens
of the whole global batch (transformers' loss with labels -100 elsewhere, on the run's first
batch), and TP2, PP2 (the pipeline's (labels, weights) path) and DP2 give the one-rank losses.

One CLI run of `scaletrain scaletest`: a single-rank reference, then one torchrun of 2 ranks for
the three layouts, 3 fp32 steps each, all from the same HF weights (saved with our default
rope_theta and norm eps: scaletest does not take those fields from `model.init_from`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from scaletrain.config.load import load_config
from scaletrain.data import GlobalBatchSampler, build_dataset
from tests.distributed import TINY, assert_losses_close, run_scaletest
from tests.hf.test_import import save_llama

LAYOUTS = ("tp2pp1dp1z0", "tp1pp2dp1z0", "tp1pp1dp2z1")


def transformers_sft_loss(folder: Path, data: Path) -> float:
    """transformers' loss on the first global batch of the run, labels -100 off the responses."""
    from transformers import AutoModelForCausalLM

    config = load_config(TINY, [f"data.paths=[{data}]"])
    t = config.train
    dataset = build_dataset(config.data.paths, None, "train", t.seq_len, t.seed, loss_mask=True)
    sampler = GlobalBatchSampler(len(dataset), t.global_batch, 0, 1, t.seed, config.data.shuffle)
    batch = torch.from_numpy(np.stack([dataset[int(i)] for i in sampler.next_batch()]))
    windows, mask = batch[:, 0], batch[:, 1]
    # Micro-batches hold different numbers of response tokens: a mean of their means differs.
    counts = mask[:, 1:].reshape(-1, t.micro_batch, t.seq_len).sum((1, 2))
    assert len(set(counts.tolist())) > 1
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=windows, labels=windows.masked_fill(mask == 0, -100)).loss.item()


@pytest.mark.slow
def test_sft_loss_is_the_global_response_mean_on_every_layout(
    sft_data: Path, tmp_path: Path
) -> None:
    llama = save_llama(tmp_path / "hf", rope_theta=10000.0, rms_norm_eps=1e-5)
    reference, layouts = run_scaletest(
        tmp_path / "runs", sft_data, LAYOUTS, f"model.init_from=hf:{llama}", "train.task=sft"
    )
    assert [m["step"] for m in reference] == [1, 2, 3]
    want = transformers_sft_loss(llama, sft_data)
    assert abs(reference[0]["loss"] - want) / want < 1e-5
    assert reference[2]["loss"] < reference[0]["loss"]
    for metrics in layouts.values():
        assert_losses_close(metrics, reference, 1e-5)
