"""LoRA over a base taken from a scaletrain checkpoint (`checkpoint.load_weights_only=true`).

The tiny model pretrained 2 steps at TP2 and saved; LoRA over that checkpoint at DP2 ZeRO-1
(another layout: the base is consolidated and sliced by the split plan); that run resumed at
step 2. Step 1 is the base model's loss on the same batch, the resume continues bit for bit,
the manifest names the base by path and manifest digest, `export hf --merge-lora` and the peft
adapter over the base exported with `export hf` give our logits within 1e-5, and a base changed
after the LoRA run started is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scaletrain.config.load import from_dict, load_config
from scaletrain.errors import ScaletrainError
from scaletrain.models.parallel import TensorParallel
from tests.distributed import REPO, TINY, read_metrics, run_cli, torchrun
from tests.finetune.test_lora import _relative, exported_logits

LORA_TINY = REPO / "configs" / "runs" / "lora-tiny.yaml"
STEP2 = "step_00000002"
LORA = ("train.steps=4", "checkpoint.interval=2", "train.eval_interval=2", "optim.lr=0.01")


def _lora_args(data: Path, run_dir: Path, resume: Path, weights_only: bool) -> tuple[str, ...]:
    return (
        "-m",
        "scaletrain",
        "train",
        "--config",
        str(LORA_TINY),
        f"data.paths=[{data}]",
        *LORA,
        f"train.run_dir={run_dir}",
        f"checkpoint.resume={resume}",
        f"checkpoint.load_weights_only={str(weights_only).lower()}",
    )


@pytest.fixture(scope="module")
def runs(stdlib_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """pre: tiny, TP2, 2 steps; lora: LoRA over pre's step 2 (DP2 ZeRO-1, 4 steps, saves at 2
    and 4); resumed: lora continued from its step 2. Output kept in each `output.log`."""
    root = tmp_path_factory.mktemp("lora_ckpt_base")
    pre = ("--config", str(TINY), f"data.paths=[{stdlib_data}]", "train.steps=2")
    pre = (*pre, "checkpoint.interval=2", "parallel.tp=2", f"train.run_dir={root / 'pre'}")
    done = torchrun(2, "-m", "scaletrain", "train", *pre)
    (root / "pre" / "output.log").write_text(done.stdout + done.stderr)
    base = root / "pre" / "checkpoints" / STEP2
    lora_step2 = root / "lora" / "checkpoints" / STEP2
    for name, resume, weights_only in (("lora", base, True), ("resumed", lora_step2, False)):
        done = torchrun(2, *_lora_args(stdlib_data, root / name, resume, weights_only))
        (root / name / "output.log").write_text(done.stdout + done.stderr)
    return {"base": base, "data": stdlib_data, "lora": root / "lora", "resumed": root / "resumed"}


def _base_model(base: Path, adapters: dict[str, torch.Tensor], group, finetune=None):
    """Our model at TP1 from the base checkpoint's consolidated weights (plus `adapters`)."""
    from scaletrain.checkpoint.lora_base import base_weights
    from scaletrain.checkpoint.manifest import Manifest
    from scaletrain.models.gpt import GPT
    from scaletrain.models.lora import LoraSpec

    manifest = Manifest.read(base)
    assert manifest is not None
    cfg = from_dict(manifest.data["config"]).model
    weights = {**base_weights(base), **adapters}
    spec = LoraSpec.of(finetune) if finetune is not None else None
    model = GPT(cfg, weights["embedding.weight"].shape[0], TensorParallel(1, group, spec)).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(m.endswith("_extra_state") for m in missing)
    return model, cfg


@pytest.mark.slow
def test_step_one_is_the_base_loss_and_resume_is_exact(
    runs: dict[str, Path], tensor_parallel: TensorParallel
) -> None:
    from scaletrain.data import GlobalBatchSampler, build_dataset

    lora, resumed = read_metrics(runs["lora"]), read_metrics(runs["resumed"])
    assert [m["step"] for m in lora] == [1, 2, 3, 4]
    # The first global batch of the LoRA run (both DP ranks' halves), through the base alone.
    config = load_config(LORA_TINY, [f"data.paths=[{runs['data']}]"])
    t = config.train
    train_set = build_dataset(config.data.paths, None, "train", t.seq_len, t.seed)
    halves = [
        GlobalBatchSampler(len(train_set), t.global_batch, r, 2, t.seed, config.data.shuffle)
        for r in range(2)
    ]
    windows = np.stack([train_set[int(i)] for s in halves for i in s.next_batch()])
    model, _ = _base_model(runs["base"], {}, tensor_parallel.group)
    with torch.no_grad():
        base_loss = model(torch.from_numpy(windows)).item()
    assert abs(lora[0]["loss"] - base_loss) / base_loss < 1e-6, (lora[0]["loss"], base_loss)
    # Training continues: the validation loss (the same windows in both runs) goes down from
    # the base's (pre's, evaluated at its last step) at each of the LoRA run's evaluations.
    base_val = read_metrics(runs["base"].parent.parent)[-1]["val_loss"]
    assert base_val > lora[1]["val_loss"] > lora[3]["val_loss"]
    curve = [(m["step"], m["loss"], m.get("val_loss"), m["lr"]) for m in resumed]
    assert curve == [(m["step"], m["loss"], m.get("val_loss"), m["lr"]) for m in lora[2:]]
    log = (runs["lora"] / "output.log").read_text()
    assert f"LoRA over the weights of {runs['base']} (new adapters, step 0)" in log


@pytest.mark.slow
def test_manifest_names_the_base_checkpoint(runs: dict[str, Path]) -> None:
    digest = hashlib.sha256((runs["base"] / "manifest.json").read_bytes()).hexdigest()
    want = {"checkpoint": str(runs["base"].resolve()), "manifest_sha256": digest}
    for run in ("lora", "resumed"):
        for step in (STEP2, "step_00000004"):
            if run == "resumed" and step == STEP2:
                continue  # the resumed run starts after step 2
            folder = runs[run] / "checkpoints" / step
            manifest = json.loads((folder / "manifest.json").read_text())
            assert manifest["lora_base"] == want, folder
            assert all(n.endswith((".lora_A", ".lora_B")) for n in manifest["parameters"])


@pytest.mark.slow
def test_exports_read_the_base_from_the_checkpoint(
    runs: dict[str, Path], tmp_path: Path, tensor_parallel: TensorParallel
) -> None:
    from scaletrain.checkpoint.consolidate import consolidated_weights
    from scaletrain.cli import main

    checkpoint = runs["resumed"] / "checkpoints" / "step_00000004"
    assert main(["export", "hf", str(checkpoint), str(tmp_path / "merged"), "--merge-lora"]) == 0
    assert main(["export", "hf", str(checkpoint), str(tmp_path / "adapter"), "--lora-adapter"]) == 0
    # peft needs the base as a Hugging Face folder: the base checkpoint, exported.
    assert main(["export", "hf", str(runs["base"]), str(tmp_path / "base")]) == 0
    manifest, adapters = consolidated_weights(checkpoint)
    finetune = from_dict(manifest.data["config"]).finetune
    ours_model, cfg = _base_model(runs["base"], adapters, tensor_parallel.group, finetune)
    plain_model, _ = _base_model(runs["base"], {}, tensor_parallel.group)
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = ours_model.logits(tokens)[..., : cfg.vocab_size]
        plain = plain_model.logits(tokens)[..., : cfg.vocab_size]
    merged, peft, exported_base = exported_logits(tmp_path, tmp_path / "base", tokens)
    assert _relative(exported_base, plain) < 1e-5  # the exported base is ours
    assert _relative(merged, ours) < 1e-5
    assert _relative(peft, ours) < 1e-5
    assert _relative(plain, ours) > 1e-3  # the adapters do change the model


@pytest.mark.slow
def test_a_changed_or_missing_base_is_refused_in_one_line(
    runs: dict[str, Path], tmp_path: Path, capsys
) -> None:
    from scaletrain.cli import main

    base, lora = runs["base"], runs["lora"] / "checkpoints" / "step_00000004"
    manifest = base / "manifest.json"
    original = manifest.read_bytes()
    before = hashlib.sha256(original).hexdigest()[:12]
    changed = json.loads(original)
    changed["saved_at"] = "2000-01-01T00:00:00+0000"  # as a re-run of the pretraining would
    try:
        manifest.write_text(json.dumps(changed, indent=1, sort_keys=True))
        after = hashlib.sha256(manifest.read_bytes()).hexdigest()[:12]
        done = run_cli(*_lora_args(runs["data"], tmp_path / "again", lora, False)[2:])
        assert done.returncode == 2
        assert done.stderr.splitlines()[-1] == (
            f"lora_base: the base checkpoint {base.resolve()} of the LoRA checkpoint {lora} "
            f"changed since the LoRA run started (manifest.json sha256 {before} -> {after}); "
            f"restore it, or start a new LoRA run over it (checkpoint.resume={base.resolve()} "
            "load_weights_only=true)"
        )
        assert not (tmp_path / "again" / "config.yaml").exists()  # refused before it started
    finally:
        manifest.write_bytes(original)
    moved = base.with_name("moved")
    base.rename(moved)
    try:
        assert main(["export", "hf", str(lora), str(tmp_path / "m"), "--merge-lora"]) == 2
        assert capsys.readouterr().err == (
            f"lora_base: the base checkpoint {base.resolve()} of the LoRA checkpoint {lora} "
            f"is missing; restore it, or start a new LoRA run over it (checkpoint.resume="
            f"{base.resolve()} load_weights_only=true)\n"
        )
    finally:
        moved.rename(base)


def test_weights_only_over_a_lora_checkpoint_is_refused(tmp_path: Path) -> None:
    """A LoRA checkpoint holds adapters only: it is no base (in process, no run)."""
    from scaletrain.checkpoint.lora_base import run_lora_base
    from scaletrain.checkpoint.manifest import Manifest
    from scaletrain.config.load import to_dict
    from scaletrain.config.lora import check_lora_resume

    config = load_config(LORA_TINY, ["checkpoint.load_weights_only=true"])
    full = load_config(TINY)
    check_lora_resume({"config": to_dict(full)}, config)  # a full checkpoint: a base for LoRA
    (tmp_path / "manifest.json").write_text("{}")
    reference = run_lora_base(config, Manifest(tmp_path, {"config": to_dict(full)}))
    assert reference is not None and reference["checkpoint"] == str(tmp_path.resolve())
    with pytest.raises(ScaletrainError) as err:
        run_lora_base(config, Manifest(tmp_path, {"config": to_dict(config)}))
    assert str(err.value) == (
        f"checkpoint.load_weights_only: {tmp_path} is a LoRA checkpoint (adapters only), not a "
        "base; resume it with checkpoint.load_weights_only=false, or export it with `scaletrain "
        "export hf --merge-lora` and set model.init_from=hf:<folder>"
    )
