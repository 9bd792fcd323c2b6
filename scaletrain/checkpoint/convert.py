"""Resume on another layout: turn a checkpoint into DeepSpeed's universal format once.

A checkpoint holds each rank's slices (TP) and flat optimizer partitions (ZeRO). To load it at
another TP, DP or ZeRO stage, DeepSpeed's converter (`deepspeed.checkpoint.ds_to_universal`)
merges them into one file per parameter and state (fp32 master, Adam moments, step); an engine
built with `checkpoint.load_universal` then takes its own slice and partition from those, and the
LR schedule and step counters from the saved model-states files.

The converter needs to know how each parameter was split over TP. We tell it from the model's
split plan (`scaletrain.models.split_plan`), checked against the manifest's `parameters`
(megatron-core's `partition_dim` / `partition_stride` at save time):
- TP-replicated (norm gains): one copy;
- row-parallel (`tp_dim` 1): concatenated along dim 1;
- column-parallel with stride 2 (the fused gate|up): two sub-parameters, each split over TP;
- other column-parallel and the vocab-parallel embedding / head: concatenated along dim 0. The
  vocabulary is padded the same way at every TP degree, so it is not declared as a vocabulary
  tensor: the converter would drop the padding rows, and the head's padding rows still take part
  in the softmax.

DeepSpeed's ZeRO-1/2 and ZeRO-3 loaders read different file names and fields from the copy,
so it is completed for both (`_serve_every_stage`), and two shortcuts of the ZeRO-3 loader are
undone after loading (`repair_optimizer`). A pipeline or MoE checkpoint on either side (pp or
ep > 1, experts; MoE x pipeline too) is converted by our own writer instead (`layout_convert`).
The universal loader never reads the module state, so the model's buffers (the router's
`score_bias`) are copied in after loading (`restore_buffers`). Not supported: ZeRO-0 on either
side (no ZeRO shards to convert, no universal loader), ZeRO-3 with TP > 1 as the target, ZeRO-3
on either side of a pipeline or MoE conversion, a change of precision, and
`checkpoint.load_weights_only` across layouts.

The converted copy lives in `<checkpoints>/.universal/step_N/`, never in the checksummed
checkpoint folder; it is written under a temporary name and renamed when complete, and a
`source.json` naming the checkpoint (by its manifest's checksum) lets later runs reuse it.

Nothing here unpickles more than weights (`safe_load`): the source is checked before it is
converted, and the converter's own loads run weights-only, unless the user opted in.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import xxhash

from scaletrain.checkpoint.layout_convert import needs_own_conversion, target_of, write_universal
from scaletrain.checkpoint.manifest import MANIFEST, Manifest
from scaletrain.checkpoint.safe_load import check_folder, load, weights_only_loading
from scaletrain.errors import ScaletrainError
from scaletrain.models.registry import saved_split_plan
from scaletrain.models.split_plan import Split, SplitPlan, check_saved_split

UNIVERSAL_DIR = ".universal"
SOURCE = "source.json"
LAYOUT_KEYS = ("tp", "pp", "dp", "ep", "zero_stage")
EXTRA_STATE = "._extra_state"  # megatron-core's (always None here); the converter stops on it


def describe_layout(layout: dict[str, Any]) -> str:
    """`tp2dp2 zero1` (pp and ep only when > 1)."""
    pp = f"pp{layout['pp']}" if layout.get("pp", 1) > 1 else ""
    ep = f"ep{layout['ep']}" if layout.get("ep", 1) > 1 else ""
    return f"tp{layout['tp']}{pp}dp{layout['dp']}{ep} zero{layout['zero_stage']}"


def same_layout(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    return all(saved.get(key, 1) == current.get(key, 1) for key in LAYOUT_KEYS)


def check_reshardable(
    manifest: Manifest,
    current: dict[str, Any],
    precision: str,
    lora: bool = False,
    weights_only: bool = False,
) -> None:
    """Raise a one-line ScaletrainError if this checkpoint cannot be loaded at `current` (by a
    LoRA run, or taking the weights only: neither goes through a universal copy)."""
    saved, name = manifest.data["layout"], manifest.folder.name
    if lora or weights_only:
        field = "finetune.lora_rank" if lora else "checkpoint.load_weights_only"
        what = "a LoRA checkpoint resumes on the layout that saved it only"
        what = what if lora else "taking only the weights on another layout is not supported"
        raise ScaletrainError(f"{field}: {manifest.folder} is {describe_layout(saved)}; {what}")
    where = f"resuming {name} ({describe_layout(saved)}) at {describe_layout(current)}"
    if "parameters" not in manifest.data:
        raise ScaletrainError(
            f"{where}: its manifest has no parameter layout (saved by an older scaletrain); "
            "resume it on its own layout once and save again"
        )
    own = needs_own_conversion(saved, current, is_moe(manifest.data))
    for side, layout in (("saved", saved), ("current", current)):
        if layout["zero_stage"] == 0:
            raise ScaletrainError(
                f"{where}: resharding needs ZeRO stage 1, 2 or 3 on both sides ({side} layout "
                "has zero_stage=0); use parallel.zero_stage>=1, or resume on the saved layout"
            )
    if own and (saved["zero_stage"] == 3 or current["zero_stage"] == 3):
        raise ScaletrainError(
            f"{where}: across pipeline or expert layouts resharding reads and writes ZeRO 1/2 "
            "partitions only; resume at zero_stage 1 or 2, save, then switch to ZeRO-3"
        )
    if current["zero_stage"] == 3 and current["tp"] > 1:
        # Its ZeRO-3 loader re-splits over TP only for AutoTP models (a process group that
        # an mpu does not provide); the ZeRO-1/2 loader does it from the converted files.
        raise ScaletrainError(
            f"{where}: DeepSpeed cannot re-split a checkpoint over TP into ZeRO-3; resume at "
            "zero_stage 1 or 2 (or tp=1), save, then switch to ZeRO-3"
        )
    if manifest.data.get("precision") != precision:
        raise ScaletrainError(
            f"{where}: the checkpoint is {manifest.data.get('precision')}, this run is "
            f"{precision}; resharding keeps the precision"
        )


def universal_info(
    parameters: dict[str, dict[str, Any]], plan: SplitPlan | None = None
) -> dict[str, Any]:
    """DeepSpeed's `universal_checkpoint_info` from the model's split plan (default: the dense
    family's), each entry checked against the split the manifest recorded at save time."""
    from deepspeed.checkpoint import constants as c

    plan = plan or saved_split_plan({})
    replicated, rows, fused = [], [], []
    for name, layout in parameters.items():
        pattern = re.escape(name) + "$"
        split = check_saved_split(plan, name, layout["tp_dim"], layout["tp_stride"])
        if split is Split.REPLICATED:
            replicated.append(pattern)
        elif split is Split.ROW:
            rows.append(pattern)
        elif split is Split.GATE_UP:  # two sub-parameters, each split over TP
            fused.append(pattern)
        # column, qkv and vocab: concatenated along dim 0 (the default); the padded
        # vocabulary is not declared as such, or the converter would drop its padding rows.
    return {
        c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        c.TP_REPLICATED_PARAMETER_PATTERNS: replicated,
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: rows,
        c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0: fused,
        c.VOCABULARY_PARAMETER_PATTERNS: [],
    }


def universal_folder(root: Path, folder: Path) -> Path:
    return root / UNIVERSAL_DIR / folder.name


def is_moe(manifest_data: dict[str, Any]) -> bool:
    return bool(manifest_data.get("config", {}).get("model", {}).get("num_experts", 0))


def conversion_target(manifest: Manifest, current: dict[str, Any]) -> dict[str, Any] | None:
    """What our own conversion writes names for (None: DeepSpeed's converter serves)."""
    moe = is_moe(manifest.data)
    if not needs_own_conversion(manifest.data["layout"], current, moe):
        return None
    return target_of(current, moe)


def ensure_universal(
    folder: Path,
    root: Path,
    is_main: bool,
    allow_pickle: bool = False,
    target: dict[str, Any] | None = None,
) -> Path:
    """Collective: the universal copy of `folder` (for a pipeline or MoE `target`, named for
    it); rank 0 converts it unless a complete one exists, the other ranks wait. Every rank
    raises if the conversion failed, and all raise the same line, before any conversion, if
    `folder` holds more than weights."""
    if not allow_pickle:
        check_folder(folder, collective=True)
    out = universal_folder(root, folder)
    error = None
    if is_main:
        try:
            if not _is_conversion_of(out, folder, target):
                convert(folder, out, allow_pickle, target)
        except Exception as exc:  # every rank must hear of it, not wait forever
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            message = [error]
            dist.broadcast_object_list(message, src=0)
    else:
        message = [None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None:
            raise ScaletrainError(
                f"converting {folder} for resharding failed on rank 0: {message[0]}"
            )
    return out


def convert(
    folder: Path, out: Path, allow_pickle: bool = False, target: dict[str, Any] | None = None
) -> None:
    """Write the universal copy of checkpoint `folder` to `out` (one process); every file is
    read weights-only unless `allow_pickle`."""
    with weights_only_loading(allow_pickle):
        _convert(folder, out, allow_pickle, target)


def _convert(folder: Path, out: Path, allow_pickle: bool, target: dict[str, Any] | None) -> None:
    from deepspeed.checkpoint import ds_to_universal

    manifest = Manifest.read(folder)
    assert manifest is not None  # the manager verified it
    out.parent.mkdir(parents=True, exist_ok=True)
    source = out.parent / f".{out.name}.source"
    partial = out.parent / f".{out.name}.partial"
    for stale in (source, partial, out):
        shutil.rmtree(stale, ignore_errors=True)
    if target is not None:  # pipelines or experts: our own writer
        write_universal(folder, partial, target, allow_pickle)
        _publish(folder, partial, out, target)
        return
    info = universal_info(manifest.data["parameters"], saved_split_plan(manifest.data))
    _filtered_source(folder, source, info, allow_pickle)
    args = Namespace(
        input_folder=str(source),
        output_folder=str(partial),
        num_extract_workers=1,  # in-process: no worker pool forked from a training rank
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    chatter = io.StringIO()  # its progress prints and bars; the manager logs one line instead
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        ds_to_universal.main(args)
    _serve_every_stage(partial, allow_pickle)
    (out.parent / "latest_universal").unlink(missing_ok=True)  # we always name the tag
    _publish(folder, partial, out, None)
    shutil.rmtree(source, ignore_errors=True)


def _publish(folder: Path, partial: Path, out: Path, target: dict[str, Any] | None) -> None:
    """Name the source (and the layout the names are for), then make the copy visible."""
    source_note = {
        "source": str(folder.resolve()),
        "manifest_xxh3": _manifest_digest(folder),
        "target": target,
    }
    (partial / SOURCE).write_text(json.dumps(source_note, indent=1))
    os.replace(partial, out)


def _filtered_source(folder: Path, source: Path, info: dict[str, Any], allow_pickle: bool) -> None:
    """What the converter reads: the optimizer shards as links, the model-states files
    rewritten without `._extra_state` entries and with the universal info added."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    source.mkdir(parents=True)
    for path in sorted(folder.glob("*.pt")):
        if path.name.endswith("_model_states.pt"):
            state = load(path, allow_pickle)
            module = state.get("module")
            if module is not None:
                state["module"] = {k: v for k, v in module.items() if not k.endswith(EXTRA_STATE)}
            state[UNIVERSAL_CHECKPOINT_INFO] = info
            torch.save(state, source / path.name)
        else:
            os.symlink(path.resolve(), source / path.name)


def _serve_every_stage(out: Path, allow_pickle: bool) -> None:
    """DeepSpeed's ZeRO-1/2 and ZeRO-3 loaders look for different things in a universal copy
    (model-states file names, the Adam step per parameter or once, the version); give each what
    it reads, whichever stage wrote the checkpoint."""
    from deepspeed.checkpoint import constants as c

    for path in out.glob("mp_rank_*_model_states.pt"):
        _alias(path, out / f"zero_pp_rank_0_{path.name}")
    for path in out.glob("zero_pp_rank_0_mp_rank_*_model_states.pt"):
        _alias(path, out / path.name.removeprefix("zero_pp_rank_0_"))
    zero = out / "zero"
    state_file = zero / "optimizer_state.pt"
    state = load(state_file, allow_pickle)
    params = sorted(p for p in zero.iterdir() if (p / "fp32.pt").is_file())
    if c.OPTIMIZER_STATE_DICT in state:  # from ZeRO-3: one step, no per-parameter step files
        step = state[c.OPTIMIZER_STATE_DICT]["state"][0]["step"]
        for param in params:
            torch.save(step, param / "step.pt")
    else:  # from ZeRO-1/2: a step file per parameter
        step = load(params[0] / "step.pt", allow_pickle)
        state[c.OPTIMIZER_STATE_DICT] = {
            "state": {0: {"step": step}},
            "param_groups": state[c.PARAM_GROUPS],
        }
    if c.DS_VERSION not in state:
        model_states = next(out.glob("mp_rank_*_model_states.pt"))
        saved = load(model_states, allow_pickle)
        state[c.DS_VERSION] = saved[c.DS_VERSION]
    torch.save(state, state_file)


def repair_optimizer(engine: Any, universal: Path, allow_pickle: bool = False) -> None:
    """Undo two shortcuts of DeepSpeed's ZeRO-3 universal loader: it gives every optimizer
    group the first group's hyperparameters (our weight decay differs per group), and one Adam
    step tensor shared by all groups, which torch's AdamW then advances once per group."""
    from deepspeed.checkpoint.constants import PARAM_GROUPS

    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()

    saved = load(universal / "zero" / "optimizer_state.pt", allow_pickle)
    groups = engine.optimizer.param_groups
    # A pipeline stage without MoE blocks has the dense groups only: a prefix of the saved list
    # (not checked by name: the ZeRO-3 loader gave every group the first group's).
    if len(groups) > len(saved[PARAM_GROUPS]):
        raise ScaletrainError(
            f"{universal.name}: {len(saved[PARAM_GROUPS])} optimizer groups saved, "
            f"{len(groups)} here"
        )
    for group, saved_group in zip(groups, saved[PARAM_GROUPS], strict=False):
        group.update({k: v for k, v in saved_group.items() if k != "params"})


def restore_buffers(engine: Any, universal: Path, allow_pickle: bool = False) -> None:
    """DeepSpeed's universal loader restores parameters from `zero/` and never reads the
    module state, so the model's persistent buffers (the router's `score_bias`) would keep
    their initial values: copy them from the copy's model-states file (`layout_convert` puts
    every stage's there under the new names)."""
    module = engine.module
    persistent = set(module.state_dict(keep_vars=True))
    buffers = {n: b for n, b in module.named_buffers() if n in persistent}
    if not buffers:
        return
    states = next(universal.glob("mp_rank_*_model_states.pt"))
    saved = load(states, allow_pickle).get("module") or {}
    for name, buffer in buffers.items():
        if name not in saved:
            raise ScaletrainError(f"{universal}: no saved value for the model's buffer {name}")
        with torch.no_grad():
            buffer.copy_(saved[name])


def _alias(path: Path, alias: Path) -> None:
    if not alias.exists():
        os.link(path, alias)


def _manifest_digest(folder: Path) -> str:
    return xxhash.xxh3_128((folder / MANIFEST).read_bytes()).hexdigest()


def _is_conversion_of(out: Path, folder: Path, target: dict[str, Any] | None) -> bool:
    try:
        note = json.loads((out / SOURCE).read_text())
    except (OSError, ValueError):
        return False
    return note.get("manifest_xxh3") == _manifest_digest(folder) and note.get("target") == target


def prune_conversions(root: Path) -> None:
    """Drop universal copies whose checkpoint is gone (pruned or replaced)."""
    conversions = root / UNIVERSAL_DIR
    if not conversions.is_dir():
        return
    for path in conversions.iterdir():
        # Dot names are leftovers of an interrupted conversion: none runs while a run saves.
        if path.is_dir() and (path.name.startswith(".") or not (root / path.name).is_dir()):
            shutil.rmtree(path, ignore_errors=True)
