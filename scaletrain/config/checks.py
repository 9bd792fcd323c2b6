"""Every rule that ties config fields together, checked before any process group exists.

Each failure is a ConfigError: one line naming the field, quoting the values, saying the fix.
`check_config` returns what it derived (dp, grad_accum, global batch, vocab sizes) so that
the trainer never computes them a second way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from scaletrain.config.lora import check_lora
from scaletrain.config.moe import check_moe
from scaletrain.config.precision import check_precision
from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError, require_positive
from scaletrain.topology.dims import ParallelDims

METADATA_FILE = "metadata.json"


@dataclass(frozen=True)
class Resolved:
    """Values derived from the config and the world size."""

    dims: ParallelDims
    micro_batch: int
    grad_accum: int
    global_batch: int
    vocab_size: int
    padded_vocab_size: int


def check_config(
    config: Config, world_size: int, check_data: bool = True, ranks_here: bool = True
) -> Resolved:
    """Validate the whole config for a world size; raise ConfigError on the first problem.

    `ranks_here`: the ranks run on this machine (not `launch slurm`), so its capabilities
    count too (fp16 on a CPU)."""
    dims = ParallelDims.resolve(
        config.parallel.tp, config.parallel.pp, config.parallel.dp, config.parallel.ep, world_size
    )
    from scaletrain.hf.imports import apply_init_from

    apply_init_from(config)  # model.init_from: the model fields from the HF folder's config
    _check_model(config, dims)
    check_precision(config, ranks_here)
    micro, accum, global_batch = _check_batch(config, dims)  # before optim: it checks steps
    check_moe(config, dims)
    check_lora(config)
    _check_classify(config, dims)
    _check_optim(config)
    _check_checkpoint(config)
    _check_fault(config)
    vocab = _check_data(config) if check_data else config.model.vocab_size
    if vocab is None:
        raise ConfigError("model.vocab_size", "is null and no data metadata was read; set it")
    if config.model.vocab_size is not None and config.model.vocab_size < vocab:
        raise ConfigError(
            "model.vocab_size",
            f"({config.model.vocab_size}) is smaller than the tokenizer's vocabulary ({vocab}) "
            f"of {config.data.paths[0]!r}; raise it or set it to null",
        )
    vocab = config.model.vocab_size or vocab
    return Resolved(
        dims=dims,
        micro_batch=micro,
        grad_accum=accum,
        global_batch=global_batch,
        vocab_size=vocab,
        padded_vocab_size=config.model.padded_vocab_size(vocab),
    )


def parse_duration(text: str) -> float:
    """Seconds in "D-HH:MM:SS", "HH:MM:SS", "MM:SS" (SLURM's forms) or a plain number."""
    days, _, clock = text.strip().rpartition("-")
    parts = clock.split(":")
    if not 1 <= len(parts) <= 3 or (days and not days.isdigit()):
        raise ValueError(text)
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + float(part)
    return seconds + 86400 * int(days or 0)


def _check_checkpoint(config: Config) -> None:
    c = config.checkpoint
    if c.interval < 0:
        raise ConfigError("checkpoint.interval", f"must be >= 0 (0 disables), got {c.interval}")
    if c.interval_minutes < 0:
        raise ConfigError(
            "checkpoint.interval_minutes", f"must be >= 0 (0 disables), got {c.interval_minutes}"
        )
    if c.keep_last < 1:
        raise ConfigError(
            "checkpoint.keep_last", f"must be >= 1 (the newest is never deleted), got {c.keep_last}"
        )
    if c.keep_every < 0:
        raise ConfigError("checkpoint.keep_every", f"must be >= 0 (0 disables), got {c.keep_every}")
    if c.dir is not None and not c.dir:
        raise ConfigError("checkpoint.dir", "must not be empty; use null for <run_dir>/checkpoints")
    if not c.resume:
        raise ConfigError("checkpoint.resume", "must be auto, none, or a checkpoint folder")
    limit = config.train.time_limit
    if limit is not None:
        try:
            seconds = parse_duration(limit)
        except ValueError:
            raise ConfigError(
                "train.time_limit",
                f"{limit!r} is not a duration; write HH:MM:SS, D-HH:MM:SS or seconds",
            ) from None
        if seconds <= 0:
            raise ConfigError("train.time_limit", f"must be > 0, got {limit!r}")


def _check_fault(config: Config) -> None:
    f = config.fault
    if f.max_consecutive_skips < 0:
        raise ConfigError(
            "fault.max_consecutive_skips",
            f"must be >= 0 (0 never rolls back), got {f.max_consecutive_skips}",
        )
    if f.spike_zscore < 0:
        raise ConfigError("fault.spike_zscore", f"must be >= 0 (0 disables), got {f.spike_zscore}")
    if f.spike_window < 2:
        raise ConfigError("fault.spike_window", f"must be >= 2 steps, got {f.spike_window}")
    require_positive(f.collective_timeout_minutes, "fault.collective_timeout_minutes")
    if f.heartbeat_seconds < 0:
        raise ConfigError(
            "fault.heartbeat_seconds", f"must be >= 0 (0 disables), got {f.heartbeat_seconds}"
        )


def _check_model(config: Config, dims: ParallelDims) -> None:
    m = config.model
    for name in ("hidden_size", "num_layers", "num_heads", "max_seq_len", "init_std"):
        require_positive(getattr(m, name), f"model.{name}")
    require_positive(m.make_vocab_size_divisible_by, "model.make_vocab_size_divisible_by")
    require_positive(m.norm_eps, "model.norm_eps")
    require_positive(m.rope_theta, "model.rope_theta")
    if m.vocab_size is not None:
        require_positive(m.vocab_size, "model.vocab_size")
    if m.num_kv_heads is not None:
        require_positive(m.num_kv_heads, "model.num_kv_heads")
    if m.ffn_hidden_size is not None:
        require_positive(m.ffn_hidden_size, "model.ffn_hidden_size")
    if m.activation_checkpointing_every < 1:
        raise ConfigError(
            "model.activation_checkpointing_every",
            f"must be >= 1 (1 recomputes every block), got {m.activation_checkpointing_every}",
        )
    if m.hidden_size % m.num_heads:
        raise ConfigError(
            "model.hidden_size",
            f"({m.hidden_size}) must be divisible by model.num_heads ({m.num_heads})",
        )
    if m.head_dim % 2:
        raise ConfigError(
            "model.num_heads",
            f"head dimension hidden_size/num_heads = {m.head_dim} must be even for rotary "
            "embeddings; change num_heads or hidden_size",
        )
    if m.num_heads % m.kv_heads:
        raise ConfigError(
            "model.num_kv_heads",
            f"({m.kv_heads}) must divide model.num_heads ({m.num_heads})",
        )
    if m.num_heads % dims.tp:
        raise ConfigError(
            "model.num_heads",
            f"({m.num_heads}) must be divisible by parallel.tp ({dims.tp})",
        )
    if m.kv_heads % dims.tp:
        raise ConfigError(
            "model.num_kv_heads",
            f"({m.kv_heads}) must be divisible by parallel.tp ({dims.tp}); "
            "use more kv heads or a smaller tp",
        )
    if m.ffn_size % dims.tp:
        raise ConfigError(
            "model.ffn_hidden_size",
            f"({m.ffn_size}) must be divisible by parallel.tp ({dims.tp})",
        )
    if m.make_vocab_size_divisible_by % dims.tp:
        raise ConfigError(
            "model.make_vocab_size_divisible_by",
            f"({m.make_vocab_size_divisible_by}) must be a multiple of parallel.tp ({dims.tp}) "
            "so that the padded vocabulary splits evenly",
        )
    _check_pipeline(config, dims)
    if config.train.seq_len > m.max_seq_len:
        raise ConfigError(
            "train.seq_len",
            f"({config.train.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})",
        )
    if config.parallel.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(
            "parallel.zero_stage", f"must be 0, 1, 2 or 3, got {config.parallel.zero_stage}"
        )


def _check_pipeline(config: Config, dims: ParallelDims) -> None:
    m, p = config.model, config.parallel
    if p.pipeline_partition == "uniform" and m.num_layers % dims.pp:
        raise ConfigError(
            "model.num_layers",
            f"({m.num_layers}) must be divisible by parallel.pp ({dims.pp}) for "
            "parallel.pipeline_partition=uniform; change pp or use pipeline_partition=parameters",
        )
    if m.num_layers < dims.pp:
        raise ConfigError(
            "parallel.pp",
            f"({dims.pp}) exceeds model.num_layers ({m.num_layers}); every stage needs a block",
        )
    if dims.pp > 1 and p.zero_stage > 1:
        raise ConfigError(
            "parallel.zero_stage",
            f"({p.zero_stage}) is not possible with parallel.pp ({dims.pp}) > 1: DeepSpeed's "
            "pipeline engine shards optimizer state only (ZeRO-2/3 are incompatible); use "
            "zero_stage=1",
        )


def _check_optim(config: Config) -> None:
    o, t = config.optim, config.train
    require_positive(o.lr, "optim.lr")
    if not 0 <= o.min_lr <= o.lr:
        raise ConfigError("optim.min_lr", f"({o.min_lr}) must be in [0, optim.lr ({o.lr})]")
    if o.warmup_steps < 0 or o.warmup_steps > t.steps:
        raise ConfigError(
            "optim.warmup_steps",
            f"({o.warmup_steps}) must be in [0, train.steps ({t.steps})]",
        )
    if o.weight_decay < 0:
        raise ConfigError("optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    for name in ("beta1", "beta2"):
        value = getattr(o, name)
        if not 0 <= value < 1:
            raise ConfigError(f"optim.{name}", f"must be in [0, 1), got {value}")
    require_positive(o.eps, "optim.eps")
    if o.grad_clip < 0:
        raise ConfigError("optim.grad_clip", f"must be >= 0 (0 disables), got {o.grad_clip}")


def _check_batch(config: Config, dims: ParallelDims) -> tuple[int, int, int]:
    t = config.train
    for name in ("micro_batch", "seq_len", "steps", "eval_batches"):
        require_positive(getattr(t, name), f"train.{name}")
    if t.eval_interval < 0:
        raise ConfigError(
            "train.eval_interval", f"must be >= 0 (0 disables), got {t.eval_interval}"
        )
    if not 0 <= t.seed < 2**32:  # numpy's seed range
        raise ConfigError("train.seed", f"must be in [0, 2**32), got {t.seed}")
    if not t.run_dir:
        raise ConfigError("train.run_dir", "must not be empty")
    require_positive(config.logging.interval, "logging.interval")
    if config.logging.peak_tflops is not None:
        require_positive(config.logging.peak_tflops, "logging.peak_tflops")
    if config.logging.straggler_interval < 0:
        raise ConfigError(
            "logging.straggler_interval",
            f"must be >= 0 (0 disables), got {config.logging.straggler_interval}",
        )
    if config.fault.straggler_threshold <= 1:
        raise ConfigError(
            "fault.straggler_threshold",
            "must be > 1 (a factor over the peers' median), "
            f"got {config.fault.straggler_threshold}",
        )
    per_step = t.micro_batch * dims.dp
    if t.grad_accum is not None:
        require_positive(t.grad_accum, "train.grad_accum")
    if t.global_batch is not None:
        require_positive(t.global_batch, "train.global_batch")
        if t.global_batch % per_step:
            raise ConfigError(
                "train.global_batch",
                f"({t.global_batch}) must be divisible by micro_batch ({t.micro_batch}) * "
                f"dp ({dims.dp}) = {per_step}",
            )
        accum = t.global_batch // per_step
        if t.grad_accum is not None and t.grad_accum != accum:
            raise ConfigError(
                "train.grad_accum",
                f"({t.grad_accum}) disagrees: global_batch ({t.global_batch}) = micro_batch "
                f"({t.micro_batch}) * grad_accum * dp ({dims.dp}) needs grad_accum = {accum}; "
                "set one of them to null",
            )
        return t.micro_batch, accum, t.global_batch
    accum = t.grad_accum or 1
    return t.micro_batch, accum, per_step * accum


def _check_classify(config: Config, dims: ParallelDims) -> None:
    """train.task: classify reads one labelled data set, without pipeline stages (LoRA is
    fine: the adapters train and so does the new score head, docs/finetuning.md#lora)."""
    if config.train.task != "classify":
        return
    if dims.pp > 1:
        raise ConfigError(
            "parallel.pp",
            f"({dims.pp}) > 1 is not supported with train.task: classify (the head reads the "
            "whole model's last hidden states); use tp or dp",
        )
    if len(config.data.paths) > 1:
        raise ConfigError(
            "data.paths",
            f"has {len(config.data.paths)} data sets; train.task: classify reads one (its "
            "labels name the head's outputs)",
        )


def _check_data(config: Config) -> int:
    d = config.data
    if not d.paths:
        raise ConfigError(
            "data.paths",
            "is empty; prepare data with `scaletrain data prepare` and list its folder",
        )
    if d.weights is not None:
        if len(d.weights) != len(d.paths):
            raise ConfigError(
                "data.weights",
                f"has {len(d.weights)} entries but data.paths has {len(d.paths)}; give one each",
            )
        if any(w < 0 for w in d.weights) or sum(d.weights) <= 0:
            raise ConfigError("data.weights", f"({d.weights}) must be >= 0 with a positive sum")
    vocab_sizes = []
    for i, path in enumerate(d.paths):
        meta = Path(path) / METADATA_FILE
        if not meta.is_file():
            raise ConfigError(
                f"data.paths[{i}]",
                f"{path!r} has no {METADATA_FILE}; "
                f"run `scaletrain data prepare --output {path} ...`",
            )
        try:
            metadata = json.loads(meta.read_text())
            vocab_sizes.append(int(metadata["vocab_size"]))
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                f"data.paths[{i}]",
                f"{str(meta)!r} has no integer vocab_size; prepare {path!r} again",
            ) from None
        kind = metadata.get("kind", "pretrain")
        if (config.train.task == "classify") != (kind == "classify"):
            raise ConfigError(
                f"data.paths[{i}]",
                f"{path!r} holds {kind} data and train.task is {config.train.task}; a classifier "
                "trains on (only) data prepared with `scaletrain data prepare --format classify`",
            )
        if config.train.task == "sft" and kind != "sft":
            raise ConfigError(
                f"data.paths[{i}]",
                f"{path!r} holds {kind} data without a loss mask; train.task: sft needs data "
                "prepared with `scaletrain data prepare --format chat|prompt-response`",
            )
    if len(set(vocab_sizes)) > 1:
        raise ConfigError(
            "data.paths",
            f"the data sets use different tokenizers (vocab sizes {vocab_sizes}); "
            "prepare them with the same --tokenizer",
        )
    return vocab_sizes[0]
