"""Whether a checkpoint can be continued by this config: compared before any weights load.

A checkpoint's manifest records the run's *identity*: the fields that change what the saved
weights, optimizer moments and data position mean (model shape, padded vocabulary, tokenizer,
data sets, sequence length, global batch, seed, optimizer, precision). A resume that differs in
any of them is refused with one line that lists each field as `old -> new`. Everything else may
change on resume: steps, the learning-rate schedule, intervals, logging, fault settings and the
parallel layout (resharding handles it); a changed schedule is described in one warning.

Plain JSON only: `scaletrain launch local` and `config check --run-dir` run the same comparison
before any process starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaletrain.checkpoint.manifest import Manifest, list_checkpoints, read_latest
from scaletrain.config.checks import Resolved
from scaletrain.config.load import from_dict, to_dict
from scaletrain.config.schema import Config
from scaletrain.data.fingerprint import dataset_fingerprint, tokenizer_hash
from scaletrain.data.format import read_metadata
from scaletrain.errors import ConfigError, ScaletrainError

IDENTITY_KEY = "identity"
OPTIMIZER = "adamw"  # the only kind today; recorded so that a future choice is compared
# What a weights-only load still needs to match: the weights must fit the model.
SHAPE_FIELDS = (
    "model.hidden_size",
    "model.num_layers",
    "model.num_heads",
    "model.num_kv_heads",
    "model.ffn_hidden_size",
    "model.num_experts",
    "model.moe_layer_freq",
    "model.tie_embeddings",
    "model.padded_vocab_size",
)
SCHEDULE_FIELDS = ("train.steps", "optim.lr", "optim.min_lr", "optim.warmup_steps")
WAYS_OUT = (
    "use a new train.run_dir, checkpoint.resume=none, or checkpoint.load_weights_only=true "
    "for a deliberate change of the training setup"
)
WAYS_OUT_WEIGHTS = "use a new train.run_dir or checkpoint.resume=none"


@dataclass(frozen=True)
class DataIdentity:
    """Per data set: its fingerprint and its tokenizer's hash."""

    fingerprint: str
    tokenizer: str


def data_identities(paths: Sequence[str]) -> list[DataIdentity]:
    """Fingerprints of every data set of the run (a few MiB read each, see fingerprint.py)."""
    out = []
    for path in paths:
        info = read_metadata(path)
        out.append(DataIdentity(dataset_fingerprint(path), tokenizer_hash(info)))
    return out


def run_identity(
    config: Config, resolved: Resolved, data: Sequence[DataIdentity]
) -> dict[str, Any]:
    """The manifest's `identity`: field path -> value, for every field a resume compares."""
    m, t = config.model, config.train
    identity: dict[str, Any] = {
        **_shape_fields(config),
        "model.moe_layer_freq": m.moe_layer_freq if m.num_experts else None,
        "model.padded_vocab_size": resolved.padded_vocab_size,
        "tokenizer": data[0].tokenizer if data else None,
        "train.seq_len": t.seq_len,
        "train.global_batch": resolved.global_batch,
        "train.seed": t.seed,
        "optimizer": OPTIMIZER,
        "precision.dtype": config.precision.dtype,
    }
    for i, d in enumerate(data):
        identity[f"data.paths[{i}]"] = d.fingerprint
    return identity


def saved_identity(manifest: Manifest) -> dict[str, Any]:
    """The identity a checkpoint recorded; for manifests older than the `identity` key, the
    fields its resolved config still tells (the others are not compared)."""
    recorded = manifest.data.get(IDENTITY_KEY)
    if isinstance(recorded, dict):
        return recorded
    try:
        config = from_dict(manifest.data.get("config") or {})
    except ConfigError:
        return {}
    t = config.train
    old = {
        **_shape_fields(config),
        "train.seq_len": t.seq_len,
        "train.seed": t.seed,
        "precision.dtype": config.precision.dtype,
    }
    if t.global_batch is not None:
        old["train.global_batch"] = t.global_batch
    return old


def _shape_fields(config: Config) -> dict[str, Any]:
    """The model fields that fix the weights' shapes (every manifest's config tells them)."""
    m = config.model
    return {
        "model.hidden_size": m.hidden_size,
        "model.num_layers": m.num_layers,
        "model.num_heads": m.num_heads,
        "model.num_kv_heads": m.kv_heads,
        "model.ffn_hidden_size": m.ffn_size,
        "model.num_experts": m.num_experts,
        "model.tie_embeddings": m.tie_embeddings,
    }


def differences(saved: dict[str, Any], current: dict[str, Any], fields: Sequence[str]) -> list[str]:
    """`field old -> new` for each compared field that differs (unknown old values pass)."""
    out = []
    for field in fields:
        if field not in saved:
            continue
        old, new = saved.get(field), current.get(field)
        if old != new:
            out.append(f"{field} {_show(old)} -> {_show(new)}")
    return out


def _show(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a hash: the first 12 hex digits tell them apart
    return str(value)


def check_resume(manifest: Manifest, config: Config, current: dict[str, Any]) -> None:
    """Raise one line if `manifest`'s checkpoint cannot be continued by this config."""
    saved = saved_identity(manifest)
    weights_only = config.checkpoint.load_weights_only
    if weights_only:
        fields: Sequence[str] = SHAPE_FIELDS
    else:
        fields = list(dict.fromkeys([*current, *(k for k in saved if k.startswith("data."))]))
    found = differences(saved, current, fields)
    if not found:
        return
    how = WAYS_OUT_WEIGHTS if weights_only else WAYS_OUT
    what = "its weights do not fit this model" if weights_only else "it was saved by another setup"
    raise ScaletrainError(
        f"resume: cannot continue {manifest.folder}: {what} ({', '.join(found)}); {how}"
    )


def schedule_note(manifest: Manifest, config: Config) -> str | None:
    """One sentence on what the learning rate does at the resumed step when the schedule
    changed (train.steps, optim.lr/min_lr/warmup_steps), else None."""
    from scaletrain.train.schedule import lr_at  # torch: only when a schedule is compared

    try:
        old_config = from_dict(manifest.data.get("config") or {})
    except ConfigError:
        return None
    old, new = to_dict(old_config), to_dict(config)
    changed = []
    for field in SCHEDULE_FIELDS:
        section, name = field.split(".")
        if old[section][name] != new[section][name]:
            changed.append(f"{field} {old[section][name]} -> {new[section][name]}")
    step = manifest.step
    if not changed or step >= config.train.steps or config.checkpoint.load_weights_only:
        return None
    lr_new = lr_at(step, config.optim, config.train.steps)
    lr_old = lr_at(step, old_config.optim, old_config.train.steps)
    return (
        f"resume: the learning-rate schedule changed ({', '.join(changed)}): step {step + 1} "
        f"uses lr {lr_new:.4g} (the saved schedule had {lr_old:.4g} there), then follows the "
        f"new schedule to {config.optim.min_lr:.4g} at step {config.train.steps}"
    )


def resume_manifest(config: Config) -> Manifest | None:
    """The manifest a resume would start from, read without unpickling anything: the folder
    `checkpoint.resume` names, or (auto) the one `latest` names, else the newest listed.
    None when the run starts fresh."""
    c = config.checkpoint
    if c.resume == "none":
        return None
    if c.resume != "auto":
        return Manifest.read(Path(c.resume))
    root = checkpoints_root(config)
    tag = read_latest(root)
    named = Manifest.read(root / tag) if tag else None
    if named is not None:
        return named
    for folder in reversed(list_checkpoints(root)):
        manifest = Manifest.read(folder)
        if manifest is not None:
            return manifest
    return None


def checkpoints_root(config: Config) -> Path:
    c = config.checkpoint
    return Path(c.dir) if c.dir else Path(config.train.run_dir) / "checkpoints"
