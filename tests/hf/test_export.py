"""`scaletrain export hf`: checkpoints saved at TP1, TP2 x PP2 and MoE EP2 become folders that
transformers loads offline as LlamaForCausalLM / MixtralForCausalLM with scaletrain's logits
(within 1e-5 relative, fp32), its tokenizer and a working `generate`."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from scaletrain.checkpoint.consolidate import consolidated_weights
from scaletrain.cli import main
from scaletrain.data.tokenizer import load_tokenizer
from scaletrain.hf.export import export_hf, find_checkpoint
from scaletrain.models.parallel import TensorParallel
from scaletrain.models.registry import saved_model_config
from tests.distributed import TINY, torchrun
from tests.hf.conftest import relative_error, scaletrain_logits

COMMON = ("train.steps=2", "checkpoint.interval=2", "train.eval_interval=0")
RUNS = {  # name: (ranks, model, overrides)
    "tp1": (1, "tiny", ()),
    "tp2pp2": (4, "tiny", ("parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1")),
    "moe-ep2": (2, "tiny-moe", ("parallel.ep=2", "parallel.zero_stage=1")),
}
ARCHITECTURES = {"tiny": "LlamaForCausalLM", "tiny-moe": "MixtralForCausalLM"}


@pytest.fixture(scope="module")
def runs(stdlib_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One short run per layout, each saving a checkpoint at step 2."""
    root = tmp_path_factory.mktemp("export-runs")
    done = {}
    for name, (ranks, model, overrides) in RUNS.items():
        config = root / f"{name}.yaml"
        config.write_text(yaml.safe_dump({**yaml.safe_load(TINY.read_text()), "model": model}))
        args = ("--config", str(config), f"data.paths=[{stdlib_data}]", *COMMON)
        args = (*args, f"train.run_dir={root / name}", *overrides)
        torchrun(ranks, "-m", "scaletrain", "train", *args)
        done[name] = root / name
    return done


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_exported_model_gives_scaletrains_logits(
    name: str,
    runs: dict[str, Path],
    stdlib_data: Path,
    tmp_path: Path,
    tensor_parallel: TensorParallel,
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    done = export_hf(runs[name], out)  # a run folder: its latest checkpoint
    assert done.checkpoint == runs[name] / "checkpoints" / "step_00000002"
    manifest, weights = consolidated_weights(done.checkpoint)
    cfg = replace(saved_model_config(manifest.data["config"]), vocab_size=512)
    assert weights["embedding.weight"].shape[0] == 512  # tiny pads 512 to 512: none to trim
    config = AutoConfig.from_pretrained(out)
    assert config.architectures == [ARCHITECTURES[RUNS[name][1]]]
    assert (config.rms_norm_eps, config.num_key_value_heads, config.vocab_size) == (1e-5, 2, 512)
    assert (config.max_position_embeddings, config.tie_word_embeddings) == (256, False)
    assert config.rope_parameters["rope_theta"] == 10000.0
    if cfg.num_experts:
        assert (config.num_local_experts, config.num_experts_per_tok) == (4, 2)

    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == ARCHITECTURES[RUNS[name][1]]
    assert hf.model.embed_tokens.weight.dtype == torch.float32
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = scaletrain_logits(weights, cfg, tensor_parallel, tokens)
    with torch.no_grad():
        theirs = hf(tokens).logits
    assert relative_error(theirs, ours) < 1e-5

    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "def main():\n    return 0\n"
    assert tokenizer(text).input_ids == load_tokenizer(stdlib_data / "tokenizer").encode(text)
    prompt = torch.tensor([tokenizer(text).input_ids])
    generated = hf.generate(prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, prompt.shape[1] + 4)
    first = scaletrain_logits(weights, cfg, tensor_parallel, prompt)[0, -1].argmax()
    assert generated[0, prompt.shape[1]] == first  # greedy: our most likely next token
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0


@pytest.mark.slow
def test_refusals_are_one_line(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("keep me")
    assert main(["export", "hf", str(runs["tp1"]), str(out)]) == 2
    assert capsys.readouterr().err == f"{out} exists; pass --force to replace it\n"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["export", "hf", str(runs["tp1"]), str(out), "--force", "--dtype", "bf16"]) == 0
    assert "as LlamaForCausalLM" in capsys.readouterr().out
    assert not (out / "keep.txt").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"

    # Routing HF Mixtral cannot express: top-1 weighted by the raw probability (HF
    # renormalises), sigmoid scores, shared experts, a selection bias.
    refused = {
        "top1": ({"moe_top_k": 1}, "top-1 routing with model.moe_top1_normalize=false cannot"),
        "sigmoid": ({"moe_score_function": "sigmoid"}, "model.moe_score_function=sigmoid cannot"),
        "shared": ({"moe_shared_experts": 1}, "model.moe_shared_experts=1 cannot be exported"),
        "bias": ({"moe_router_bias_update_rate": 0.001}, "model.moe_router_bias_update_rate=0.001"),
    }
    for name, (fields, start) in refused.items():
        changed = tmp_path / name
        shutil.copytree(find_checkpoint(runs["moe-ep2"]), changed)
        manifest = json.loads((changed / "manifest.json").read_text())
        manifest["config"]["model"].update(fields)
        (changed / "manifest.json").write_text(json.dumps(manifest))
        assert main(["export", "hf", str(changed), str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"{changed}: {start}")
        assert err.count("\n") == 1 and not (tmp_path / "never").exists()
