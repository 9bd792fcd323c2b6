"""Offline checkpoint tools behind `scaletrain ckpt`: list, verify, consolidate.

All of it runs in one plain process (no torch.distributed): listing and verifying read only
`manifest.json` and the bytes of each file; consolidation turns a sharded checkpoint of any
ZeRO stage and TP degree into one fp32 safetensors file with the model's parameter names.

Consolidation goes through DeepSpeed's `zero_to_fp32` once per TP rank, then merges the TP
slices with the split each parameter was saved with (`parameters[name].tp_dim/tp_stride` in the
manifest): with stride s the full tensor is cut along tp_dim into tp * s chunks and TP rank r
holds chunks r, r + tp, r + 2 tp, ... (megatron-core's layout; the fused gate|up uses s = 2).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from scaletrain.checkpoint.manifest import (
    LATEST,
    MANIFEST,
    STAGING,
    Manifest,
    check_file,
    list_checkpoints,
    step_of,
)
from scaletrain.errors import ScaletrainError
from scaletrain.logs import get_logger

if TYPE_CHECKING:
    import torch

log = get_logger(__name__)

# manager.py pulls in megatron-core, seconds of imports that `ckpt list` should not pay; torch
# too is only imported where tensors are touched.
CHECKPOINTS = "checkpoints"
EXTRA_STATE = "._extra_state"  # megatron-core's per-layer FP8 metadata: None here, not a weight
COMPLETE = "complete"
INCOMPLETE = "incomplete (not visible)"
CORRUPT = "corrupt"


class CheckpointCorrupt(ScaletrainError):
    """A checkpoint whose files do not match its manifest (exit 1, unlike usage errors)."""

    exit_code = 1


# ---- list and verify ----------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One row of `ckpt list`."""

    tag: str  # `step_00000012`, or `.staging/step_00000014` for a save that never finished
    step: int | None
    bytes: int
    files: int
    layout: str
    saved_at: str
    status: str
    visible: bool

    @property
    def corrupt(self) -> bool:
        return self.visible and self.status != COMPLETE


@dataclass(frozen=True)
class Listing:
    root: Path
    entries: list[Entry]
    latest: str | None  # what the `latest` pointer says, whether or not it exists

    @property
    def corrupt(self) -> list[Entry]:
        return [e for e in self.entries if e.corrupt]

    @property
    def latest_missing(self) -> bool:
        visible = {e.tag for e in self.entries if e.visible}
        return self.latest is not None and self.latest not in visible


def checkpoints_root(path: Path) -> Path:
    """The checkpoint folder of a run: `path` itself, `path/checkpoints`, or the run's
    `checkpoint.dir` from its config.yaml."""
    if not path.is_dir():
        raise ScaletrainError(f"{path}: no such folder")
    if (path / CHECKPOINTS).is_dir():
        return path / CHECKPOINTS
    if path.name == CHECKPOINTS or _holds_checkpoints(path):
        return path
    custom = _configured_dir(path / "config.yaml")
    if custom is not None and custom.is_dir():
        return custom
    raise ScaletrainError(
        f"{path}: no checkpoints here; give a run folder or its checkpoints folder"
    )


def _holds_checkpoints(path: Path) -> bool:
    if (path / LATEST).is_file() or (path / STAGING).is_dir():
        return True
    return any(p.is_dir() and step_of(p) is not None for p in path.iterdir())


def _configured_dir(config_file: Path) -> Path | None:
    try:
        config = yaml.safe_load(config_file.read_text())
    except (OSError, yaml.YAMLError):
        return None
    folder = (config or {}).get("checkpoint", {}).get("dir") if isinstance(config, dict) else None
    return Path(folder) if folder else None


def verify_folder(folder: Path) -> str | None:
    """None if every file matches the manifest, else the first problem (one line).

    The single-process twin of `CheckpointManager.verify`, with the same messages.
    """
    manifest = Manifest.read(folder)
    if manifest is None:
        return f"{MANIFEST} is missing or unreadable"
    for entry in manifest.files:
        problem = check_file(folder, entry)
        if problem:
            return problem
    return None


def verify(folder: Path) -> Manifest:
    """The manifest of a checkpoint whose files all check out; CheckpointCorrupt otherwise."""
    if not folder.is_dir():
        raise ScaletrainError(f"{folder}: no such folder")
    if step_of(folder) is None and not (folder / MANIFEST).is_file():
        raise ScaletrainError(
            f"{folder} is not a checkpoint folder; give one step_* folder (see `ckpt list`)"
        )
    problem = verify_folder(folder)
    if problem:
        raise CheckpointCorrupt(f"corrupt: {folder}: {problem}")
    manifest = Manifest.read(folder)
    assert manifest is not None  # verify_folder read it
    return manifest


def describe_layout(data: dict[str, Any]) -> str:
    """`tp2pp1dp2 zero3 bf16` from a manifest."""
    layout = data.get("layout", {})
    text = f"tp{layout.get('tp', '?')}pp{layout.get('pp', '?')}dp{layout.get('dp', '?')}"
    if layout.get("ep", 1) != 1:
        text += f"ep{layout['ep']}"
    return f"{text} zero{layout.get('zero_stage', '?')} {data.get('precision', '?')}"


def list_run(path: Path) -> Listing:
    """Every checkpoint under a run (visible ones verified file by file) and staging leftovers."""
    root = checkpoints_root(path)
    entries = [_visible_entry(folder) for folder in list_checkpoints(root)]
    hidden = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    hidden = [p for p in hidden if not (p / MANIFEST).is_file()]  # not a checkpoint yet
    staging = root / STAGING
    if staging.is_dir():
        hidden += [p for p in staging.iterdir() if p.is_dir() and step_of(p) is not None]
    entries += [_hidden_entry(root, folder) for folder in hidden]
    entries.sort(key=lambda e: (e.step or 0, not e.visible, e.tag))
    pointer = root / LATEST
    latest = pointer.read_text().strip() if pointer.is_file() else None
    return Listing(root, entries, latest or None)


def _visible_entry(folder: Path) -> Entry:
    manifest = Manifest.read(folder)
    if manifest is None:
        count, size = _disk_usage(folder)
        problem = f"{MANIFEST} is missing or unreadable"
        return Entry(
            folder.name, step_of(folder), size, count, "-", "-", f"{CORRUPT}: {problem}", True
        )
    problem = verify_folder(folder)
    return Entry(
        tag=folder.name,
        step=manifest.step,
        bytes=manifest.total_bytes,
        files=len(manifest.files),
        layout=describe_layout(manifest.data),
        saved_at=str(manifest.data.get("saved_at", "-")),
        status=f"{CORRUPT}: {problem}" if problem else COMPLETE,
        visible=True,
    )


def _hidden_entry(root: Path, folder: Path) -> Entry:
    count, size = _disk_usage(folder)
    manifest = Manifest.read(folder)  # rank 0 writes it just before the rename
    layout = describe_layout(manifest.data) if manifest else "-"
    return Entry(
        tag=str(folder.relative_to(root)),
        step=step_of(folder),
        bytes=size,
        files=count,
        layout=layout,
        saved_at="-",
        status=INCOMPLETE,
        visible=False,
    )


def _disk_usage(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST]
    return len(files), sum(p.stat().st_size for p in files)


def human_bytes(count: int) -> str:
    if count >= 1e9:
        return f"{count / 1e9:.2f} GB"
    if count >= 1e6:
        return f"{count / 1e6:.1f} MB"
    return f"{count / 1e3:.1f} kB"


def format_listing(listing: Listing) -> list[str]:
    """The `ckpt list` table as aligned lines; `*` marks the checkpoint `latest` points to."""
    if not listing.entries:
        return [f"no checkpoints in {listing.root}"]
    header = ("", "TAG", "STEP", "SIZE", "FILES", "LAYOUT", "SAVED_AT", "STATUS")
    rows = [header]
    for e in listing.entries:
        mark = "*" if e.visible and e.tag == listing.latest else ""
        step = "-" if e.step is None else str(e.step)
        size = human_bytes(e.bytes)
        rows.append((mark, e.tag, step, size, str(e.files), e.layout, e.saved_at, e.status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = {2, 3, 4}  # numbers
    lines = []
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row[:-1])
        ]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    if listing.latest is None:
        lines.append("latest: none")
    else:
        missing = " (missing)" if listing.latest_missing else ""
        lines.append(f"latest: {listing.latest}{missing}")
    return lines


# ---- consolidate --------------------------------------------------------------------------
@dataclass(frozen=True)
class Consolidated:
    out: Path
    step: int
    tensors: int
    parameters: int
    bytes: int


def check_trusted(folder: Path, allow_pickle: bool) -> None:
    """DeepSpeed's files are pickles (loading one can run code): only open those a run of
    ours wrote, i.e. a `step_*` folder inside a `checkpoints/` folder with a `latest` pointer,
    unless the user vouches for them (`checkpoint.allow_external_pickle` for training)."""
    parent = folder.resolve().parent
    if allow_pickle or (parent.name == CHECKPOINTS and (parent / LATEST).is_file()):
        return
    raise ScaletrainError(
        f"{folder} is not inside a run's {CHECKPOINTS}/ folder and DeepSpeed's files are loaded "
        "with pickle, which can run code; pass --allow-pickle if you trust it"
    )


def consolidate(folder: Path, out: Path, allow_pickle: bool = False) -> Consolidated:
    """Write the full fp32 weights of a checkpoint as one safetensors file at `out`."""
    from safetensors.torch import save_file

    if not folder.is_dir():
        raise ScaletrainError(f"{folder}: no such folder")
    check_trusted(folder, allow_pickle)
    manifest = verify(folder)
    if manifest.data.get("config", {}).get("model", {}).get("num_experts", 0):
        raise ScaletrainError(
            f"{folder}: consolidating an MoE checkpoint is not supported (its experts are in "
            "per-expert files that DeepSpeed's zero_to_fp32 does not read)"
        )
    layout = manifest.data["layout"]
    if layout.get("pp", 1) != 1 or layout.get("ep", 1) != 1:
        raise ScaletrainError(
            f"{folder}: consolidating pipeline or expert parallel checkpoints "
            f"(pp={layout.get('pp')}, ep={layout.get('ep')}) is not supported"
        )
    parameters: dict[str, dict[str, Any]] = manifest.data.get("parameters") or {}
    if not parameters:
        raise ScaletrainError(f"{folder}: the manifest has no parameter layout to merge with")
    tp, zero_stage = int(layout["tp"]), int(layout["zero_stage"])
    ranks = [_tp_rank_weights(folder, r, zero_stage) for r in range(tp)]
    tensors = {}
    for name, info in parameters.items():
        slices = []
        for rank, weights in enumerate(ranks):
            if name not in weights:
                raise ScaletrainError(f"{folder}: {name} is not in the weights of TP rank {rank}")
            local = weights.pop(name)
            if list(local.shape) != list(info["shape"]):
                raise ScaletrainError(
                    f"{folder}: {name} of TP rank {rank} has shape {list(local.shape)}, "
                    f"the manifest says {info['shape']}"
                )
            slices.append(local)
        tensors[name] = merge_tp_slices(slices, info["tp_dim"], info["tp_stride"], name)
    leftover = sorted({n for w in ranks for n in w if not n.endswith(EXTRA_STATE)})
    if leftover:
        log.warning("not parameters, left out: %s", ", ".join(leftover))
    del ranks
    if out.is_dir():
        out = out / "model.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "step": str(manifest.step), "source": str(folder)}
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", delete=False) as f:
        tmp = Path(f.name)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    count = sum(t.numel() for t in tensors.values())
    return Consolidated(out, manifest.step, len(tensors), count, out.stat().st_size)


def merge_tp_slices(
    slices: list[torch.Tensor], tp_dim: int | None, tp_stride: int | None, name: str = "?"
) -> torch.Tensor:
    """The full fp32 tensor from the TP ranks' slices (in TP-rank order), as a new
    contiguous tensor. A replicated tensor (tp_dim None) is TP rank 0's copy."""
    import torch

    if tp_dim is None:
        first = slices[0]
        if any(not torch.equal(first, other) for other in slices[1:]):
            log.warning("%s differs between TP ranks; taking TP rank 0's copy", name)
        return first.to(torch.float32).clone(memory_format=torch.contiguous_format)
    stride = tp_stride or 1
    if any(s.shape[tp_dim] % stride for s in slices):
        raise ScaletrainError(f"{name}: a slice of dim {tp_dim} does not split into {stride}")
    parts = [s.chunk(stride, dim=tp_dim) for s in slices]
    # Rank r's k-th part is chunk k * tp + r of the full tensor.
    ordered = [rank_parts[k] for k in range(stride) for rank_parts in parts]
    return torch.cat(ordered, dim=tp_dim).to(torch.float32).contiguous()


def split_tp(
    full: torch.Tensor, tp: int, rank: int, tp_dim: int | None, tp_stride: int | None
) -> torch.Tensor:
    """TP rank `rank`'s slice of `full`: the inverse of `merge_tp_slices`."""
    import torch

    if tp_dim is None:
        return full
    chunks = full.chunk(tp * (tp_stride or 1), dim=tp_dim)
    return torch.cat(chunks[rank::tp], dim=tp_dim)


def _tp_rank_weights(folder: Path, tp_rank: int, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full-over-DP fp32 weights of one TP rank, named as the model's parameters."""

    if zero_stage == 0:
        return _zero0_weights(folder / f"mp_rank_{tp_rank:02d}_model_states.pt")
    _cpu_accelerator_unless_cuda()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # zero_to_fp32 reads every *_model_states.pt / *_optim_states.pt of a folder, i.e. all TP
    # ranks at once; a folder of links to one TP rank's files gives it what it expects.
    suffix = f"mp_rank_{tp_rank:02d}"
    with tempfile.TemporaryDirectory(prefix="scaletrain-consolidate-") as tmp:
        view = Path(tmp) / suffix
        view.mkdir()
        pattern = re.compile(rf"(.+_)?{suffix}_(model|optim)_states\.pt")
        mine = [p for p in folder.iterdir() if pattern.fullmatch(p.name)]
        if not mine:
            raise ScaletrainError(f"{folder}: no DeepSpeed files of TP rank {tp_rank}")
        for path in mine:
            (view / path.name).symlink_to(path.resolve())
        chatter = io.StringIO()  # zero_to_fp32 prints its progress; keep stdout for results
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            weights = get_fp32_state_dict_from_zero_checkpoint(tmp, tag=suffix)
        log.debug("zero_to_fp32 for %s: %s", suffix, chatter.getvalue())
    return {name: tensor.float() for name, tensor in weights.items()}


def _zero0_weights(path: Path) -> dict[str, torch.Tensor]:
    """ZeRO-0 has no optimizer shards: the module holds the fp32 weights, or, in bf16/fp16,
    DeepSpeed's mixed-precision optimizer holds the fp32 master copies in its groups."""
    import torch

    if not path.is_file():
        raise ScaletrainError(f"{path} is missing")
    state = torch.load(path, map_location="cpu", weights_only=False)
    buffers = set(state.get("buffer_names") or [])
    module = {
        name: value
        for name, value in state["module"].items()
        if torch.is_tensor(value) and not name.endswith(EXTRA_STATE) and name not in buffers
    }
    optimizer = state.get("optimizer") or {}
    groups = optimizer.get("fp32_groups") or optimizer.get("fp32_groups_flat")
    if groups is None:
        if any(t.dtype != torch.float32 for t in module.values()):
            raise ScaletrainError(f"{path}: low-precision weights without fp32 master copies")
        return module
    return _name_master_groups(path, module, groups)


def _name_master_groups(
    path: Path, module: dict[str, torch.Tensor], groups: list[Any]
) -> dict[str, torch.Tensor]:
    """Name DeepSpeed's fp32 master groups: they follow our optimizer's parameter groups
    (scaletrain.engine.deepspeed.param_groups: matrices, then vectors, in model order)."""
    import torch

    names = [
        [n for n, t in module.items() if t.dim() >= 2],
        [n for n, t in module.items() if t.dim() < 2],
    ]
    if len(groups) != len(names):
        raise ScaletrainError(
            f"{path}: {len(groups)} fp32 master groups, expected {len(names)} (matrices, vectors)"
        )
    named = {}
    for group_names, group in zip(names, groups, strict=True):
        shapes = [module[n].shape for n in group_names]
        if torch.is_tensor(group):  # one flat tensor per group (the fused optimizer)
            sizes = [math.prod(s) for s in shapes]
            if group.numel() < sum(sizes):
                raise ScaletrainError(f"{path}: an fp32 master group is smaller than its params")
            group = [
                p.view(s) for p, s in zip(group[: sum(sizes)].split(sizes), shapes, strict=True)
            ]
        if [tuple(t.shape) for t in group] != [tuple(s) for s in shapes]:
            raise ScaletrainError(f"{path}: fp32 master shapes do not match the module's")
        named.update({n: t.float() for n, t in zip(group_names, group, strict=True)})
    return named


def _cpu_accelerator_unless_cuda() -> None:
    """DeepSpeed picks its accelerator on import; without a GPU say so instead of a warning."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
