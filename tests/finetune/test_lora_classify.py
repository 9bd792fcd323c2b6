"""LoRA for sequence classification (`train.task: classify` with `finetune.lora_rank > 0`): the
adapters train and so does the new `score` head, in full (peft's `task_type=SEQ_CLS`,
`modules_to_save=["score"]`); everything else is frozen (docs/finetuning.md#lora).

In process: only the adapters and score take gradients and optimizer state, the base stays bit
for bit. Multi-process, over a base saved by transformers' `LlamaForCausalLM` (three torchruns,
6 fp32 steps, evaluation over the whole validation split at steps 3 and 6): DP2 ZeRO-3 equals
one rank's loss, validation loss, accuracy and F1; the DP2 run resumed at step 3 continues bit
for bit; the checkpoint holds the adapters and score plus the base's source; `export hf
--merge-lora` (a `LlamaForSequenceClassification`) and `--lora-adapter` (peft over the base LM
loaded as its README.md says) give our unmerged classifier's logits within 1e-5, and the run's
val metrics are those of the merged model over the split.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from scaletrain.config.schema import FinetuneConfig
from scaletrain.models.parallel import TensorParallel
from tests.distributed import assert_losses_close, read_metrics, torchrun
from tests.finetune.test_lora import LORA_TINY, SMALL, _relative, _sha

SPEC_LABELS = ("a", "b", "c")


def test_only_adapters_and_score_train(tensor_parallel: TensorParallel) -> None:
    from scaletrain.engine.deepspeed import param_groups
    from scaletrain.models.classifier import Classifier, ClassifySpec
    from scaletrain.models.lora import LoraSpec, freeze_base

    spec = LoraSpec.of(FinetuneConfig(lora_rank=4, lora_alpha=8.0))
    torch.manual_seed(5)
    head = ClassifySpec(SPEC_LABELS, 0)
    model = Classifier(SMALL, 128, TensorParallel(1, tensor_parallel.group, spec), head)
    trainable, frozen = freeze_base(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"score.weight"} | {
        n for n, _ in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))
    }
    adapters = 2 * 4 * (64 + 128 + 64 + 64 + 64 + 256 + 128 + 64)
    assert trainable == adapters + 3 * 64  # the score: [3 labels, hidden 64]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-2)
    window = torch.randint(1, 128, (4, 17), generator=torch.Generator().manual_seed(2))
    window[:, -1] = torch.tensor([0, 1, 2, 1])  # the labels
    model(window).backward()
    optimizer.step()
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in optimizer.state} == trained  # no optimizer state for the base
    for name, param in model.named_parameters():
        moved = not torch.equal(param, before[name])
        # A's gradient is zero while B is zero (step 1), so only B and the score move.
        assert moved == (name == "score.weight" or name.endswith(".lora_B")), name
    assert frozen == sum(p.numel() for p in model.parameters()) - trainable


# ---- multi-process: DP2 ZeRO-3 vs one rank, exact resume, checkpoint, export --------------

CLASSIFY = ("train.task=classify", "train.seq_len=64", "optim.lr=0.01")
# 160 validation examples = 20 global batches of 8: the whole split, each example once.
EVAL = ("train.eval_batches=20",)
RUNS = {  # name: (ranks, overrides); "resumed" restarts "z3" at step 3
    "one": (1, ()),
    "z3": (2, ("parallel.zero_stage=3",)),
    "resumed": (2, ("parallel.zero_stage=3",)),
}


@pytest.fixture(scope="module")
def classify_runs(classify_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """LoRA classifiers over a transformers-made base LM: one rank, DP2 ZeRO-3, and the DP2
    run resumed at step 3 (the output of each in its `output.log`)."""
    from tests.hf.test_import import save_llama

    root = tmp_path_factory.mktemp("lora-classify")
    base = save_llama(root / "base")
    before = _sha(base)
    config = ("--config", str(LORA_TINY), f"data.paths=[{classify_data}]")
    config = (*config, f"model.init_from=hf:{base}", *CLASSIFY, *EVAL)
    runs = {"base": base}
    resume = f"checkpoint.resume={root / 'z3' / 'checkpoints' / 'step_00000003'}"
    for name, (ranks, extra) in RUNS.items():
        run = ("-m", "scaletrain", "train", *config, f"train.run_dir={root / name}", *extra)
        done = torchrun(ranks, *run, *((resume,) if name == "resumed" else ()))
        (root / name / "output.log").write_text(done.stdout + done.stderr)
        runs[name] = root / name
    assert _sha(base) == before  # the base is read, never written
    return runs


@pytest.mark.slow
def test_dp2_equals_one_rank_and_resumes_exactly(classify_runs: dict[str, Path]) -> None:
    one, z3, resumed = (read_metrics(classify_runs[n]) for n in ("one", "z3", "resumed"))
    assert abs(one[0]["loss"] - np.log(6)) < 0.3  # six labels, a fresh head: ~uniform
    val_losses = [m["val_loss"] for m in one if "val_loss" in m]
    assert abs(val_losses[1] - val_losses[0]) > 1e-3  # 6 steps of a random base: it moves
    for key in ("loss", "val_loss"):
        assert_losses_close(z3, one, rel=1e-5, key=key)
    evals = [(m["val_accuracy"], m["val_f1"]) for m in z3 if "val_accuracy" in m]
    assert len(evals) == 2
    for (acc, f1), want in zip(evals, [m for m in one if "val_accuracy" in m], strict=True):
        assert acc == want["val_accuracy"] and f1 == pytest.approx(want["val_f1"], abs=1e-12)
    keys = ("step", "loss", "val_loss", "val_accuracy", "val_f1", "lr")
    curve = [tuple(m.get(k) for k in keys) for m in resumed]
    assert curve == [tuple(m.get(k) for k in keys) for m in z3[3:]]


@pytest.mark.slow
def test_checkpoint_holds_adapters_score_and_the_base(classify_runs: dict[str, Path]) -> None:
    folder = classify_runs["z3"] / "checkpoints" / "step_00000006"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["lora_base"] == {"init_from": f"hf:{classify_runs['base'].resolve()}"}
    names = sorted(manifest["parameters"])
    assert names[-1] == "score.weight"
    assert len(names) == 2 * 2 * 4 + 1  # 2 blocks x 4 targets x (A, B), the score
    assert all(n.endswith((".lora_A", ".lora_B")) for n in names[:-1])
    log = (classify_runs["z3"] / "output.log").read_text()
    found = [line.split("INFO ", 1)[1] for line in log.splitlines() if "LoRA: " in line]
    assert found == [  # the score is 6 x 64; ZeRO-3: each rank holds half the frozen base
        "LoRA: 13696 adapter and score parameters train, 106816 base ones frozen, 53408 of "
        "them held on this rank"
    ]


def _readme_model(folder: Path):
    """The model the adapter folder's README.md loads, by running its code block."""
    code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S)
    assert code is not None
    scope: dict = {}
    exec(code.group(1), scope)
    return scope["model"]


@pytest.mark.slow
def test_export_merged_and_adapter_give_our_logits(
    classify_runs: dict[str, Path], classify_data: Path, tmp_path: Path, tensor_parallel
) -> None:
    from transformers import AutoModelForSequenceClassification

    from scaletrain.checkpoint.consolidate import consolidated_weights
    from scaletrain.config.load import from_dict
    from scaletrain.data.classify import ClassifyDataset
    from scaletrain.hf.export import export_hf, find_checkpoint
    from scaletrain.hf.lora_export import ADAPTER_WEIGHTS, with_base
    from scaletrain.models.classifier import Classifier, ClassifySpec
    from scaletrain.models.classify_plan import decoder_only
    from scaletrain.models.lora import LoraSpec
    from scaletrain.train.classify import macro_f1

    run = classify_runs["z3"]
    merged = export_hf(run, tmp_path / "merged", lora="merge")
    assert merged.architecture == "LlamaForSequenceClassification"
    adapter = export_hf(run, tmp_path / "adapter", lora="adapter")
    assert adapter.parameters == 13696
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["README.md", "adapter_config.json", ADAPTER_WEIGHTS]
    peft_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (peft_config["task_type"], peft_config["modules_to_save"]) == ("SEQ_CLS", ["score"])
    # Ours, unmerged: the base LM's decoder, the run's adapters and score, at TP1.
    manifest, trained = consolidated_weights(find_checkpoint(run))
    config = from_dict(manifest.data["config"])
    weights = decoder_only(with_base(trained, classify_runs["base"], config.model))
    tp = TensorParallel(1, tensor_parallel.group, LoraSpec.of(config.finetune))
    ours_model = Classifier(config.model, 512, tp, ClassifySpec.of_data(str(classify_data)))
    missing, unexpected = ours_model.eval().load_state_dict(weights, strict=False)
    assert not unexpected and all(m.endswith("_extra_state") for m in missing)

    val = ClassifyDataset(classify_data, "val", 64)
    rows = torch.from_numpy(np.stack([val[i] for i in range(len(val))]))
    tokens, truth = rows[:, :-1], rows[:, -1]
    lengths = torch.randint(5, 65, (len(tokens),), generator=torch.Generator().manual_seed(0))
    padded = tokens.masked_fill(torch.arange(64) >= lengths[:, None], 0)  # the pad id is 0
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    peft = _readme_model(tmp_path / "adapter").eval()
    with torch.no_grad():
        plain = AutoModelForSequenceClassification.from_pretrained(
            classify_runs["base"], num_labels=6, pad_token_id=0
        )
        for batch in (tokens, padded):
            ours = ours_model.scores(batch)
            assert _relative(hf(batch).logits, ours) < 1e-5
            assert _relative(peft(batch).logits, ours) < 1e-5
        scored = hf(tokens).logits
        base_decoder = plain.model(tokens).last_hidden_state[:, -1]  # no adapters
        adapted = hf.model(tokens).last_hidden_state[:, -1]
    assert _relative(base_decoder, adapted) > 1e-3  # the adapters did change the decoder
    # The run's metrics at step 6 are those of the merged model over the whole split.
    evals = [m for m in read_metrics(run) if "val_accuracy" in m]
    predicted = scored.argmax(-1)
    confusion = np.zeros((6, 6), dtype=np.int64)
    np.add.at(confusion, (truth.numpy(), predicted.numpy()), 1)
    assert evals[-1]["val_accuracy"] == (predicted == truth).sum().item() / len(truth)
    assert evals[-1]["val_f1"] == pytest.approx(macro_f1(confusion), abs=1e-12)
    want_loss = torch.nn.functional.cross_entropy(scored, truth).item()
    assert abs(evals[-1]["val_loss"] - want_loss) / want_loss < 1e-5
