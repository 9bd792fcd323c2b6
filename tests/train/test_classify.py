"""`train.task: classify` through the trainer: TP2, DP2 (ZeRO-1 and ZeRO-3) give the one-rank
losses; `export hf` of a ZeRO-3 DP2 checkpoint is a `LlamaForSequenceClassification` whose
logits are ours (padded rows too), and the run's val_loss / val_accuracy / val_f1, gathered over
its two DP ranks, are those one process computes over the whole validation split.

One `scaletrain scaletest` (a single-rank reference, then one torchrun of 2 ranks for three
layouts, 3 fp32 steps each) and one 2-rank run with evaluation over the whole validation split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from scaletrain.checkpoint.consolidate import consolidated_weights
from scaletrain.data.classify import ClassifyDataset
from scaletrain.hf.export import export_hf
from scaletrain.models.classifier import Classifier, ClassifySpec
from scaletrain.models.parallel import TensorParallel
from scaletrain.models.registry import saved_model_config
from scaletrain.train.classify import macro_f1
from tests.distributed import assert_losses_close, run_scaletest, train
from tests.hf.conftest import relative_error

LAYOUTS = ("tp2pp1dp1z0", "tp1pp1dp2z1", "tp1pp1dp2z3")
CLASSIFY = ("train.task=classify", "train.seq_len=64")
# 160 validation examples = 20 global batches of 8: the whole split, each example once.
EVAL = ("train.steps=6", "train.eval_interval=3", "train.eval_batches=20")


@pytest.mark.slow
def test_classify_loss_is_the_same_on_every_layout(classify_data: Path, tmp_path: Path) -> None:
    reference, layouts = run_scaletest(tmp_path / "runs", classify_data, LAYOUTS, *CLASSIFY)
    assert [m["step"] for m in reference] == [1, 2, 3]
    assert abs(reference[0]["loss"] - np.log(6)) < 0.3  # six labels, a fresh head: ~uniform
    for metrics in layouts.values():
        assert_losses_close(metrics, reference, 1e-5)


@pytest.mark.slow
def test_export_and_eval_metrics_match_transformers(
    classify_data: Path, tmp_path: Path, tensor_parallel: TensorParallel
) -> None:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    dp2 = train(2, tmp_path / "dp2", classify_data, *CLASSIFY, *EVAL, "parallel.zero_stage=3")
    evals = [m for m in dp2 if "val_accuracy" in m]
    assert [m["step"] for m in evals] == [3, 6]

    out = tmp_path / "hf"
    done = export_hf(tmp_path / "dp2", out)
    assert done.architecture == "LlamaForSequenceClassification"
    config = AutoConfig.from_pretrained(out)
    labels = ["asyncio", "email", "json", "multiprocessing", "unittest", "xml"]
    assert (config.num_labels, config.pad_token_id) == (6, 0)
    assert config.id2label == dict(enumerate(labels))
    assert config.label2id == {name: i for i, name in enumerate(labels)}
    hf = AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification"

    val = ClassifyDataset(classify_data, "val", 64)
    rows = torch.from_numpy(np.stack([val[i] for i in range(len(val))]))
    tokens, truth = rows[:, :-1], rows[:, -1]
    # The same rows cut to 5..64 tokens and padded: the last real token is anywhere.
    lengths = torch.randint(5, 65, (len(tokens),), generator=torch.Generator().manual_seed(0))
    padded = tokens.masked_fill(torch.arange(64) >= lengths[:, None], 0)
    manifest, weights = consolidated_weights(done.checkpoint)
    cfg = saved_model_config(manifest.data["config"])
    ours_model = Classifier(cfg, 512, tensor_parallel, ClassifySpec(tuple(labels), 0)).eval()
    missing, unexpected = ours_model.load_state_dict(weights, strict=False)
    assert not unexpected and all(m.endswith("_extra_state") for m in missing)
    with torch.no_grad():
        ours, theirs = ours_model.scores(tokens), hf(tokens).logits
        ours_padded, theirs_padded = ours_model.scores(padded), hf(padded).logits
    assert relative_error(theirs, ours) < 1e-5
    assert relative_error(theirs_padded, ours_padded) < 1e-5
    assert relative_error(ours_padded, ours) > 1e-2  # the padding did change what is classified
    # The run's metrics at step 6 are those of the whole split, as one process computes them
    # from the exported model: each DP rank classified half of it.
    predicted = theirs.argmax(-1)
    confusion = np.zeros((6, 6), dtype=np.int64)
    np.add.at(confusion, (truth.numpy(), predicted.numpy()), 1)
    assert evals[-1]["val_accuracy"] == (predicted == truth).sum().item() / len(truth)
    assert evals[-1]["val_f1"] == pytest.approx(macro_f1(confusion), abs=1e-12)
    want_loss = torch.nn.functional.cross_entropy(theirs, truth).item()
    assert abs(evals[-1]["val_loss"] - want_loss) / want_loss < 1e-5
