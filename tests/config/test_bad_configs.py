"""`scaletrain config check` on bad configs: exit code 2 and exactly one line on stderr.

Every case is a set of overrides on the valid base run (see conftest.py) plus, where needed,
extra files. `{tmp}` in overrides, files and messages is the test's tmp_path. The message is
compared in full, so a changed wording shows up here and gets reviewed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from scaletrain.cli import main

SECTIONS = "model, parallel, precision, optim, train, data, checkpoint, fault, logging, finetune"
TRAIN_FIELDS = (
    "micro_batch, global_batch, grad_accum, seq_len, steps, eval_interval, eval_batches, seed, "
    "run_dir, deterministic, time_limit, task"
)
OVERRIDE_SYNTAX = "must be written section.field=value, e.g. parallel.tp=2"


@dataclass(frozen=True)
class Bad:
    """One bad config: what to pass to `config check` and the exact stderr line expected."""

    overrides: tuple[str, ...]
    expected: str
    world: int = 4
    config: str = "run.yaml"
    """The --config file inside tmp_path (the base run unless a case writes its own)."""
    files: dict[str, str] = field(default_factory=dict)
    """Extra files to write into tmp_path before the check."""


def case(name: str, *overrides: str, expected: str, **kwargs: object) -> object:
    return pytest.param(Bad(overrides, expected, **kwargs), id=name)


DATA = "data:\n  paths: [{tmp}/data]\n"

CASES = [
    # --- loading: files, syntax, unknown keys, types -------------------------------------
    case(
        "missing_config_file",
        config="missing.yaml",
        expected="config error: --config: file '{tmp}/missing.yaml' does not exist",
    ),
    case(
        "invalid_yaml",
        config="broken.yaml",
        files={"broken.yaml": "train:\n  steps: [1, 2\n  seed: 3\n"},
        expected="config error: --config: '{tmp}/broken.yaml' is not valid YAML at line 3",
    ),
    case(
        "duplicate_key",
        config="twice.yaml",
        files={"twice.yaml": "optim:\n  lr: 1.0e-3\n  warmup_steps: 2\n  lr: 2.0e-3\n" + DATA},
        expected="config error: --config: '{tmp}/twice.yaml': key 'lr' is given twice "
        "(lines 2 and 4); keep one",
    ),
    case(
        "duplicate_section",
        config="twice.yaml",
        files={"twice.yaml": "train:\n  steps: 5\n" + DATA + "train:\n  seed: 3\n"},
        expected="config error: --config: '{tmp}/twice.yaml': key 'train' is given twice "
        "(lines 1 and 5); keep one",
    ),
    case(
        "duplicate_key_in_model_file",
        config="composed.yaml",
        files={
            "composed.yaml": "model: twice-model.yaml\n" + DATA,
            "twice-model.yaml": "hidden_size: 64\nnum_heads: 4\nhidden_size: 128\n",
        },
        expected="config error: model.base: '{tmp}/twice-model.yaml': key 'hidden_size' is given "
        "twice (lines 1 and 3); keep one",
    ),
    case(
        "run_file_not_a_mapping",
        config="list.yaml",
        files={"list.yaml": "- train\n- data\n"},
        expected="config error: --config: '{tmp}/list.yaml' must hold a mapping of sections",
    ),
    case(
        "section_not_a_mapping",
        config="flat.yaml",
        files={"flat.yaml": "train: 5\n" + DATA},
        expected="config error: train: expected a mapping of fields, got 5",
    ),
    case(
        "override_into_non_mapping_section",
        "train.steps=3",
        config="flat.yaml",
        files={"flat.yaml": "train: 5\n" + DATA},
        expected="config error: train: must be a mapping of fields",
    ),
    case(
        "model_base_not_found",
        config="nosuch.yaml",
        files={"nosuch.yaml": "model: nosuch\n" + DATA},
        expected="config error: model.base: model file 'nosuch' not found "
        "(looked in {tmp_parent}/models/nosuch.yaml, configs/models/nosuch.yaml)",
    ),
    case(
        "model_file_invalid_yaml",
        config="composed.yaml",
        files={
            "composed.yaml": "model: {{base: broken-model.yaml, num_layers: 2}}\n" + DATA,
            "broken-model.yaml": "hidden_size: 64\nnum_heads: [4\n",
        },
        expected="config error: model.base: '{tmp}/broken-model.yaml' is not valid YAML at line 3",
    ),
    case(
        "model_file_not_a_mapping",
        config="composed.yaml",
        files={
            "composed.yaml": "model: list-model.yaml\n" + DATA,
            "list-model.yaml": "- 64\n- 4\n",
        },
        expected="config error: model.base: '{tmp}/list-model.yaml' must hold a mapping of fields",
    ),
    case(
        "unknown_section",
        "trainer.steps=10",
        expected=f"config error: trainer: unknown section; known sections are {SECTIONS}",
    ),
    case(
        "unknown_field",
        "train.stepz=10",
        expected=f"config error: train.stepz: unknown field; known fields are {TRAIN_FIELDS}",
    ),
    case(
        "unknown_field_in_file",
        config="typo.yaml",
        files={"typo.yaml": "train:\n  steps: 10\n  lr: 0.1\n" + DATA},
        expected=f"config error: train.lr: unknown field; known fields are {TRAIN_FIELDS}",
    ),
    case(
        "override_without_section",
        "foo=1",
        expected=f"config error: foo: override 'foo=1' {OVERRIDE_SYNTAX}",
    ),
    case(
        "override_three_parts",
        "a.b.c=1",
        expected=f"config error: a.b.c: override 'a.b.c=1' {OVERRIDE_SYNTAX}",
    ),
    case(
        "override_without_value",
        "train.steps",
        expected=f"config error: train.steps: override 'train.steps' {OVERRIDE_SYNTAX}",
    ),
    case(
        "override_invalid_yaml_value",
        "data.paths=[{tmp}/data",
        expected="config error: data.paths: value '[{tmp}/data' is not valid YAML; "
        "fix it or put it in quotes",
    ),
    case(
        "int_given_word",
        "train.steps=ten",
        expected="config error: train.steps: expected an integer, got 'ten'",
    ),
    case(
        "int_given_float",
        "train.micro_batch=2.5",
        expected="config error: train.micro_batch: expected an integer, got 2.5",
    ),
    case(
        "int_given_bool",
        "parallel.tp=true",
        expected="config error: parallel.tp: expected an integer, got true",
    ),
    case(
        "int_given_null",
        "train.steps=",
        expected="config error: train.steps: expected an integer, got null",
    ),
    case(
        "float_given_word",
        "optim.lr=fast",
        expected="config error: optim.lr: expected a number, got 'fast'",
    ),
    case(
        "float_given_bool",
        "optim.weight_decay=false",
        expected="config error: optim.weight_decay: expected a number, got false",
    ),
    case(
        "float_not_finite",
        "optim.lr=.nan",
        expected="config error: optim.lr: expected a finite number, got nan",
    ),
    case(
        "bool_given_word",
        "data.shuffle=maybe",
        expected="config error: data.shuffle: expected true or false, got 'maybe'",
    ),
    case(
        "bool_given_int",
        "train.deterministic=1",
        expected="config error: train.deterministic: expected true or false, got 1",
    ),
    case(
        "str_given_list",
        "train.run_dir=[a]",
        expected="config error: train.run_dir: expected a string, got ['a']",
    ),
    case(
        "list_given_str",
        "data.paths={tmp}/data",
        expected="config error: data.paths: expected a list, got '{tmp}/data'",
    ),
    case(
        "list_item_wrong_type",
        "data.weights=[1, heavy]",
        expected="config error: data.weights[1]: expected a number, got 'heavy'",
    ),
    case(
        "fp16_and_bf16",
        "precision.dtype=fp16+bf16",
        expected="config error: precision.dtype: 'fp16+bf16' is not one of fp32 | bf16 | fp16",
    ),
    case(
        "dtype_list",
        "precision.dtype=[fp16, bf16]",
        expected="config error: precision.dtype: ['fp16', 'bf16'] is not one of fp32 | bf16 | fp16",
    ),
    # --- data ----------------------------------------------------------------------------
    case(
        "data_paths_empty",
        "data.paths=[]",
        expected="config error: data.paths: is empty; prepare data with `scaletrain data prepare` "
        "and list its folder",
    ),
    case(
        "data_path_without_metadata",
        "data.paths=[{tmp}/raw]",
        files={"raw/notes.txt": "not prepared"},
        expected="config error: data.paths[0]: '{tmp}/raw' has no metadata.json; "
        "run `scaletrain data prepare --output {tmp}/raw ...`",
    ),
    case(
        "data_path_missing",
        "data.paths=[{tmp}/data, {tmp}/nowhere]",
        expected="config error: data.paths[1]: '{tmp}/nowhere' has no metadata.json; "
        "run `scaletrain data prepare --output {tmp}/nowhere ...`",
    ),
    case(
        "data_metadata_without_vocab",
        "data.paths=[{tmp}/odd]",
        files={"odd/metadata.json": '{{"dtype": "uint16"}}'},
        expected="config error: data.paths[0]: '{tmp}/odd/metadata.json' has no integer "
        "vocab_size; prepare '{tmp}/odd' again",
    ),
    case(
        "data_different_tokenizers",
        "data.paths=[{tmp}/data, {tmp}/other]",
        files={"other/metadata.json": '{{"vocab_size": 512}}'},
        expected="config error: data.paths: the data sets use different tokenizers "
        "(vocab sizes [300, 512]); prepare them with the same --tokenizer",
    ),
    case(
        "data_weights_length",
        "data.weights=[1.0, 2.0]",
        expected="config error: data.weights: has 2 entries but data.paths has 1; give one each",
    ),
    case(
        "data_weights_negative",
        "data.weights=[-1]",
        expected="config error: data.weights: ([-1.0]) must be >= 0 with a positive sum",
    ),
    case(
        "vocab_smaller_than_tokenizer",
        "model.vocab_size=256",
        expected="config error: model.vocab_size: (256) is smaller than the tokenizer's "
        "vocabulary (300) of '{tmp}/data'; raise it or set it to null",
    ),
    # --- layout versus world size --------------------------------------------------------
    case(
        "tp_pp_dp_not_world",
        "parallel.dp=3",
        expected="config error: parallel: tp (1) * pp (1) * dp (3) = 3 must equal the world "
        "size (4); set parallel.dp=null to derive dp",
    ),
    case(
        "world_not_divisible_by_tp_pp",
        "parallel.tp=4",
        world=6,
        expected="config error: parallel: world size (6) is not divisible by tp (4) * pp (1); "
        "change tp/pp or the number of ranks",
    ),
    case("tp_zero", "parallel.tp=0", expected="config error: parallel.tp: must be >= 1, got 0"),
    case("pp_zero", "parallel.pp=0", expected="config error: parallel.pp: must be >= 1, got 0"),
    case("ep_zero", "parallel.ep=0", expected="config error: parallel.ep: must be >= 1, got 0"),
    case(
        "dp_zero",
        "parallel.dp=0",
        expected="config error: parallel.dp: must be >= 1 or null, got 0",
    ),
    case("world_zero", world=0, expected="config error: world_size: must be >= 1, got 0"),
    case(
        "layers_not_divisible_by_pp",
        "parallel.pp=2",
        "model.num_layers=3",
        expected="config error: model.num_layers: (3) must be divisible by parallel.pp (2) for "
        "parallel.pipeline_partition=uniform; change pp or use pipeline_partition=parameters",
    ),
    case(
        "pp_more_than_layers",
        "parallel.pp=4",
        "model.num_layers=2",
        "parallel.pipeline_partition=parameters",
        expected="config error: parallel.pp: (4) exceeds model.num_layers (2); every stage "
        "needs a block",
    ),
    case(
        "pp_with_zero2",
        "parallel.pp=2",
        "parallel.zero_stage=2",
        expected="config error: parallel.zero_stage: (2) is not possible with parallel.pp (2) > "
        "1: DeepSpeed's pipeline engine shards optimizer state only (ZeRO-2/3 are "
        "incompatible); use zero_stage=1",
    ),
    case(
        "pp_partition_unknown",
        "parallel.pipeline_partition=layers",
        expected="config error: parallel.pipeline_partition: 'layers' is not one of uniform | "
        "parameters",
    ),
    # --- mixture of experts ------------------------------------------------------------
    case(
        "ep_without_experts",
        "parallel.ep=2",
        expected="config error: parallel.ep: (2) splits experts, but the model is dense; set "
        "model.num_experts or ep=1",
    ),
    case(
        "ep_not_dividing_dp",
        "parallel.ep=3",
        "model.num_experts=6",
        expected="config error: parallel.ep: expert_parallel (3) must divide data_parallel (4)",
    ),
    case(
        "experts_not_divisible_by_ep",
        "parallel.ep=4",
        "model.num_experts=6",
        expected="config error: model.num_experts: (6) must be divisible by parallel.ep (4)",
    ),
    case(
        "moe_top_k_9",
        "model.num_experts=16",
        "model.moe_top_k=9",
        expected="config error: model.moe_top_k: must be 1 to 8, got 9",
    ),
    case(
        "moe_score_function_unknown",
        "model.num_experts=4",
        "model.moe_score_function=relu",
        expected="config error: model.moe_score_function: 'relu' is not one of softmax | sigmoid",
    ),
    case(
        "moe_router_bias_update_rate_negative",
        "model.num_experts=4",
        "model.moe_router_bias_update_rate=-0.001",
        expected="config error: model.moe_router_bias_update_rate: must be >= 0, got -0.001",
    ),
    case(
        "moe_shared_experts_negative",
        "model.num_experts=4",
        "model.moe_shared_experts=-1",
        expected="config error: model.moe_shared_experts: must be >= 0, got -1",
    ),
    case(
        "moe_top_k_over_experts",
        "model.num_experts=1",
        expected="config error: model.moe_top_k: (2) exceeds model.num_experts (1)",
    ),
    case(
        "moe_capacity_factor_zero",
        "model.num_experts=4",
        "model.moe_capacity_factor=0",
        expected="config error: model.moe_capacity_factor: must be > 0, got 0.0",
    ),
    case(
        "moe_layer_freq_zero",
        "model.num_experts=4",
        "model.moe_layer_freq=0",
        expected="config error: model.moe_layer_freq: must be > 0, got 0",
    ),
    case(
        "moe_aux_loss_negative",
        "model.num_experts=4",
        "model.moe_aux_loss_coeff=-0.1",
        expected="config error: model.moe_aux_loss_coeff: must be >= 0, got -0.1",
    ),
    case(
        "moe_with_zero3",
        "model.num_experts=4",
        "parallel.zero_stage=3",
        expected="config error: parallel.zero_stage: (3) is refused by DeepSpeed's native MoE "
        "layer (it cannot partition expert parameters over the expert-data-parallel group) and "
        "DeepSpeed's AutoEP accepts only Hugging Face models without megatron-core TP; use "
        "zero_stage 1 or 2",
    ),
    case(
        "moe_min_capacity_over_tokens_top1",
        "model.num_experts=4",
        "model.moe_top_k=1",
        "model.moe_min_capacity=200",
        expected="config error: model.moe_min_capacity: (200) exceeds the tokens of a "
        "micro-batch (128, micro_batch * seq_len), which DeepSpeed's top-1 gate refuses; lower it",
    ),
    case(
        "moe_capacity_not_split_by_tp",
        "model.num_experts=4",
        "model.moe_top_k=1",
        "model.moe_capacity_factor=1.03",
        "parallel.tp=2",
        expected="config error: model.moe_capacity_factor: gives an expert capacity of 33 tokens "
        "per micro-batch, which DeepSpeed must split evenly over parallel.tp (2); change it, "
        "moe_min_capacity or micro_batch * seq_len",
    ),
    case(
        "num_experts_negative",
        "model.num_experts=-1",
        expected="config error: model.num_experts: must be >= 0 (0 = dense), got -1",
    ),
    case(
        "checkpoint_keep_last_zero",
        "checkpoint.keep_last=0",
        expected="config error: checkpoint.keep_last: must be >= 1 (the newest is never "
        "deleted), got 0",
    ),
    case(
        "checkpoint_interval_minutes_negative",
        "checkpoint.interval_minutes=-1",
        expected="config error: checkpoint.interval_minutes: must be >= 0 (0 disables), got -1.0",
    ),
    case(
        "time_limit_garbage",
        "train.time_limit=soon",
        expected="config error: train.time_limit: 'soon' is not a duration; write HH:MM:SS, "
        "D-HH:MM:SS or seconds",
    ),
    case(
        "time_limit_zero",
        "train.time_limit='00:00:00'",
        expected="config error: train.time_limit: must be > 0, got '00:00:00'",
    ),
    case(
        "spike_action_unknown",
        "fault.spike_action=panic",
        expected="config error: fault.spike_action: 'panic' is not one of log | rollback",
    ),
    case(
        "spike_window_too_small",
        "fault.spike_window=1",
        expected="config error: fault.spike_window: must be >= 2 steps, got 1",
    ),
    case(
        "checkpoint_interval_negative",
        "checkpoint.interval=-5",
        expected="config error: checkpoint.interval: must be >= 0 (0 disables), got -5",
    ),
    case(
        "zero_stage_4",
        "parallel.zero_stage=4",
        expected="config error: parallel.zero_stage: must be 0, 1, 2 or 3, got 4",
    ),
    # --- model shape versus tp -----------------------------------------------------------
    case(
        "heads_not_divisible_by_tp",
        "model.hidden_size=96",
        "model.num_heads=6",
        "model.num_kv_heads=null",
        "parallel.tp=4",
        expected="config error: model.num_heads: (6) must be divisible by parallel.tp (4)",
    ),
    case(
        "kv_heads_not_divisible_by_tp",
        "parallel.tp=4",
        expected="config error: model.num_kv_heads: (2) must be divisible by parallel.tp (4); "
        "use more kv heads or a smaller tp",
    ),
    case(
        "kv_heads_not_dividing_heads",
        "model.num_kv_heads=3",
        expected="config error: model.num_kv_heads: (3) must divide model.num_heads (4)",
    ),
    case(
        "hidden_not_divisible_by_heads",
        "model.hidden_size=66",
        expected="config error: model.hidden_size: (66) must be divisible by model.num_heads (4)",
    ),
    case(
        "odd_head_dim",
        "model.hidden_size=36",
        expected="config error: model.num_heads: head dimension hidden_size/num_heads = 9 must "
        "be even for rotary embeddings; change num_heads or hidden_size",
    ),
    case(
        "ffn_not_divisible_by_tp",
        "model.ffn_hidden_size=129",
        "parallel.tp=2",
        expected="config error: model.ffn_hidden_size: (129) must be divisible by parallel.tp (2)",
    ),
    case(
        "vocab_padding_not_multiple_of_tp",
        "model.make_vocab_size_divisible_by=3",
        "parallel.tp=2",
        expected="config error: model.make_vocab_size_divisible_by: (3) must be a multiple of "
        "parallel.tp (2) so that the padded vocabulary splits evenly",
    ),
    case(
        "seq_len_above_max",
        "train.seq_len=512",
        expected="config error: train.seq_len: (512) exceeds model.max_seq_len (256)",
    ),
    case(
        "hidden_negative",
        "model.hidden_size=-64",
        expected="config error: model.hidden_size: must be > 0, got -64",
    ),
    case(
        "vocab_zero",
        "model.vocab_size=0",
        expected="config error: model.vocab_size: must be > 0, got 0",
    ),
    case(
        "kv_heads_zero",
        "model.num_kv_heads=0",
        expected="config error: model.num_kv_heads: must be > 0, got 0",
    ),
    case(
        "activation_checkpointing_unknown",
        "model.activation_checkpointing=selective",
        expected="config error: model.activation_checkpointing: 'selective' is not one of "
        "none | full | every_n",
    ),
    case(
        "activation_checkpointing_every_zero",
        "model.activation_checkpointing=every_n",
        "model.activation_checkpointing_every=0",
        expected="config error: model.activation_checkpointing_every: must be >= 1 "
        "(1 recomputes every block), got 0",
    ),
    # --- precision -----------------------------------------------------------------------
    case(
        "loss_scale_with_bf16",
        "precision.dtype=bf16",
        "precision.loss_scale=1024",
        expected="config error: precision.loss_scale: (1024.0) only applies to fp16, but "
        "precision.dtype is 'bf16'; set it to 0",
    ),
    case(
        "loss_scale_negative",
        "precision.dtype=fp16",
        "precision.loss_scale=-1",
        expected="config error: precision.loss_scale: must be >= 0 (0 = dynamic), got -1.0",
    ),
    case(
        "initial_scale_power_too_big",
        "precision.initial_scale_power=40",
        expected="config error: precision.initial_scale_power: must be in 0..32, got 40",
    ),
    case(
        "hysteresis_zero",
        "precision.hysteresis=0",
        expected="config error: precision.hysteresis: must be > 0, got 0",
    ),
    # --- optimizer -----------------------------------------------------------------------
    case(
        "min_lr_above_lr",
        "optim.min_lr=1e-3",
        expected="config error: optim.min_lr: (0.001) must be in [0, optim.lr (0.0003)]",
    ),
    case("lr_zero", "optim.lr=0", expected="config error: optim.lr: must be > 0, got 0.0"),
    case(
        "warmup_above_steps",
        "optim.warmup_steps=200",
        expected="config error: optim.warmup_steps: (200) must be in [0, train.steps (100)]",
    ),
    case(
        "warmup_negative",
        "optim.warmup_steps=-1",
        expected="config error: optim.warmup_steps: (-1) must be in [0, train.steps (100)]",
    ),
    case(
        "beta2_one",
        "optim.beta2=1.0",
        expected="config error: optim.beta2: must be in [0, 1), got 1.0",
    ),
    case(
        "beta1_negative",
        "optim.beta1=-0.1",
        expected="config error: optim.beta1: must be in [0, 1), got -0.1",
    ),
    case(
        "weight_decay_negative",
        "optim.weight_decay=-0.1",
        expected="config error: optim.weight_decay: must be >= 0, got -0.1",
    ),
    case(
        "grad_clip_negative",
        "optim.grad_clip=-1",
        expected="config error: optim.grad_clip: must be >= 0 (0 disables), got -1.0",
    ),
    # --- batch arithmetic and the run ----------------------------------------------------
    case(
        "global_batch_not_divisible",
        "train.global_batch=12",
        expected="config error: train.global_batch: (12) must be divisible by micro_batch (2) * "
        "dp (4) = 8",
    ),
    case(
        "grad_accum_disagrees",
        "train.grad_accum=3",
        expected="config error: train.grad_accum: (3) disagrees: global_batch (16) = micro_batch "
        "(2) * grad_accum * dp (4) needs grad_accum = 2; set one of them to null",
    ),
    case(
        "micro_batch_zero",
        "train.micro_batch=0",
        expected="config error: train.micro_batch: must be > 0, got 0",
    ),
    case(
        "steps_zero",
        "train.steps=0",
        expected="config error: train.steps: must be > 0, got 0",
    ),
    case(
        "eval_interval_negative",
        "train.eval_interval=-1",
        expected="config error: train.eval_interval: must be >= 0 (0 disables), got -1",
    ),
    case(
        "seed_negative",
        "train.seed=-1",
        expected="config error: train.seed: must be in [0, 2**32), got -1",
    ),
    case(
        "run_dir_empty",
        "train.run_dir=''",
        expected="config error: train.run_dir: must not be empty",
    ),
    case(
        "logging_interval_zero",
        "logging.interval=0",
        expected="config error: logging.interval: must be > 0, got 0",
    ),
    case(
        "peak_tflops_negative",
        "logging.peak_tflops=-1",
        expected="config error: logging.peak_tflops: must be > 0, got -1.0",
    ),
]


def _fill(text: str, tmp: Path) -> str:
    return text.format(tmp=tmp, tmp_parent=tmp.parent)


def _argv(bad: Bad, tmp: Path) -> list[str]:
    for name, text in bad.files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_fill(text, tmp))
    config = str(tmp / bad.config)
    overrides = [_fill(o, tmp) for o in bad.overrides]
    return ["config", "check", "--config", config, "--world-size", str(bad.world), *overrides]


def _check_in_process(bad: Bad, tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(_argv(bad, tmp))
    out, err = capsys.readouterr()
    assert (code, out, err) == (2, "", _fill(bad.expected, tmp) + "\n")


def test_enough_cases() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("bad", CASES)
def test_bad_config(bad: Bad, run_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _check_in_process(bad, run_file.parent, capsys)


SUBPROCESS_CASES = [
    case(
        "unknown_field",
        "model.num_layer=4",
        expected="config error: model.num_layer: unknown field; known fields are vocab_size, "
        "make_vocab_size_divisible_by, hidden_size, num_layers, num_heads, num_kv_heads, "
        "ffn_hidden_size, max_seq_len, rope_theta, norm_eps, tie_embeddings, init_std, "
        "num_experts, moe_top_k, moe_top1_normalize, moe_score_function, moe_shared_experts, "
        "moe_router_bias_update_rate, moe_capacity_factor, moe_eval_capacity_factor, "
        "moe_min_capacity, moe_drop_tokens, moe_aux_loss_coeff, moe_z_loss_coeff, "
        "moe_layer_freq, activation_checkpointing, activation_checkpointing_every, init_from",
    ),
    case(
        "fp16_and_bf16",
        "precision.dtype=fp16+bf16",
        expected="config error: precision.dtype: 'fp16+bf16' is not one of fp32 | bf16 | fp16",
    ),
    case(
        "world_size_mismatch",
        "parallel.tp=2",
        "parallel.dp=1",
        world=4,
        expected="config error: parallel: tp (2) * pp (1) * dp (1) = 2 must equal the world "
        "size (4); set parallel.dp=null to derive dp",
    ),
]


@pytest.mark.parametrize("bad", SUBPROCESS_CASES)
def test_bad_config_subprocess(bad: Bad, run_file: Path, repo_root: Path) -> None:
    """The real command: status 2, one stderr line, no traceback, nothing on stdout."""
    tmp = run_file.parent
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "scaletrain", *_argv(bad, tmp)],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stderr == _fill(bad.expected, tmp) + "\n"
    assert (proc.returncode, proc.stdout) == (2, "")
