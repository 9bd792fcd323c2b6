"""`scaletrain ckpt consolidate`: a sharded checkpoint of any ZeRO stage and TP degree as one
fp32 safetensors file with the model's parameter names, in one plain process.

Pipeline and MoE checkpoints at ZeRO 1/2 (fp32 or bf16; MoE x pipeline too) take the fp32
masters from the optimizer partitions (`zero_state`), under whole-model names and global expert
ids, and the model's buffers the split plan names (the router's `score_bias`) from the
model-states files; at ZeRO-0 in bf16 / fp16 from DeepSpeed's mixed-precision optimizer state
(`zero0_state`). Others go through DeepSpeed's `zero_to_fp32` once per TP rank, then merge the
TP slices with the split its family's split plan gives each parameter
(`scaletrain.models.split_plan`), checked against the split the manifest recorded at save time
(`parameters[name].tp_dim/tp_stride`).

Every file is read weights-only (`safe_load`; `zero_to_fp32`'s own loads too), so a checkpoint
from anywhere is safe to consolidate; one that needs full unpickling asks for `--allow-pickle`.
The output never replaces an existing file without `force`, never lands in a checkpoint folder
(a `latest` pointer overwritten there breaks the run), and gets the user's umask.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scaletrain.checkpoint.manifest import MANIFEST, Manifest, step_of
from scaletrain.checkpoint.safe_load import CLI_OPT_IN, check_folder, load, weights_only_loading
from scaletrain.checkpoint.tools import holds_checkpoints, verify
from scaletrain.checkpoint.zero0_state import zero0_masters
from scaletrain.checkpoint.zero_state import read_buffers, read_zero_state, whole_name
from scaletrain.errors import ScaletrainError
from scaletrain.logs import get_logger
from scaletrain.models.registry import pipeline_layer_names, saved_model_config, saved_split_plan
from scaletrain.models.split_plan import check_saved_split, merge_tp_slices, split_tp

__all__ = ["consolidate", "merge_tp_slices", "output_path", "split_tp"]

if TYPE_CHECKING:
    import torch

log = get_logger(__name__)

EXTRA_STATE = "._extra_state"  # megatron-core's per-layer FP8 metadata: None here, not a weight
EXPERTS = ".deepspeed_experts."  # DeepSpeed's MoE experts: in files of their own
DEFAULT_NAME = "model.safetensors"


@dataclass(frozen=True)
class Consolidated:
    out: Path
    step: int
    tensors: int
    parameters: int
    bytes: int


def output_path(out: Path, force: bool) -> Path:
    """Where to write (`out`, or `out/model.safetensors` for a folder), refused in one line if
    that replaces a file without `force` or lies inside a checkpoint folder."""
    if out.is_dir():
        out = out / DEFAULT_NAME
    for parent in out.resolve().parents:
        is_checkpoint = step_of(parent) is not None and (parent / MANIFEST).is_file()
        if is_checkpoint or holds_checkpoints(parent):
            raise ScaletrainError(
                f"{out} is inside the checkpoint folder {parent}; write the consolidated "
                "file somewhere else"
            )
    if out.is_dir() or (out.exists() and not out.is_file()):
        raise ScaletrainError(f"{out} exists and is not a file; give a file path")
    if out.exists() and not force:
        raise ScaletrainError(f"{out} exists; pass --force to replace it")
    return out


def consolidate(
    folder: Path, out: Path, allow_pickle: bool = False, force: bool = False
) -> Consolidated:
    """Write the full fp32 weights of a checkpoint as one safetensors file at `out`."""
    if not folder.is_dir():
        raise ScaletrainError(f"{folder}: no such folder")
    out = output_path(out, force)
    manifest, tensors = consolidated_weights(folder, allow_pickle)
    metadata = {"format": "pt", "step": str(manifest.step), "source": str(folder)}
    _write(tensors, metadata, out, force)
    count = sum(t.numel() for t in tensors.values())
    return Consolidated(out, manifest.step, len(tensors), count, out.stat().st_size)


def consolidated_weights(
    folder: Path, allow_pickle: bool = False
) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """The verified manifest of checkpoint `folder` and its full fp32 weights by name."""
    manifest = verify(folder)
    moe = bool(manifest.data.get("config", {}).get("model", {}).get("num_experts", 0))
    layout = manifest.data["layout"]
    pipelined = layout.get("pp", 1) > 1
    precision = manifest.data.get("precision")
    tp, zero_stage = int(layout["tp"]), int(layout["zero_stage"])
    parameters: dict[str, dict[str, Any]] = manifest.data.get("parameters") or {}
    if not parameters:
        raise ScaletrainError(f"{folder}: the manifest has no parameter layout to merge with")
    if not allow_pickle:
        check_folder(folder, CLI_OPT_IN)
    if (pipelined or moe) and zero_stage > 0:
        # The fp32 masters of every stage and expert, from the optimizer partitions; the
        # buffers (the router's score_bias), in none of them, from the model-states files.
        with weights_only_loading(allow_pickle):
            state = read_zero_state(folder, manifest, allow_pickle, states=("fp32",))
            buffers = read_buffers(folder, manifest, allow_pickle)
        weights = {name: full["fp32"] for name, full in state.tensors.items()}
        return manifest, weights | {name: t.float() for name, t in buffers.items()}
    if (pipelined or moe) and precision != "fp32":  # ZeRO-0: DeepSpeed's bf16/fp16 optimizers
        with weights_only_loading(allow_pickle):
            weights = zero0_masters(folder, manifest, allow_pickle)
            buffers = read_buffers(folder, manifest, allow_pickle)
        return manifest, weights | {name: t.float() for name, t in buffers.items()}
    plan = saved_split_plan(manifest.data)
    with weights_only_loading(allow_pickle):
        if pipelined:
            names = pipeline_layer_names(saved_model_config(manifest.data["config"]))
            parameters = {whole_name(n, names): info for n, info in parameters.items()}
            ranks = [_stage_weights(folder, r, names, allow_pickle) for r in range(tp)]
        elif moe:
            ranks = [_moe_weights(folder, r, allow_pickle) for r in range(tp)]
            # The manifest names this rank's experts only; the others follow the plan.
            parameters = {
                n: parameters.get(n) or {} for n in ranks[0] if n in parameters or EXPERTS in n
            }
        else:
            ranks = [_tp_rank_weights(folder, r, zero_stage, allow_pickle) for r in range(tp)]
    tensors = {}
    for name, info in parameters.items():
        slices = []
        for rank, weights in enumerate(ranks):
            if name not in weights:
                raise ScaletrainError(f"{folder}: {name} is not in the weights of TP rank {rank}")
            local = weights.pop(name)
            if info and list(local.shape) != list(info["shape"]):
                raise ScaletrainError(
                    f"{folder}: {name} of TP rank {rank} has shape {list(local.shape)}, "
                    f"the manifest says {info['shape']}"
                )
            slices.append(local)
        if info:
            split = check_saved_split(plan, name, info["tp_dim"], info["tp_stride"])
        else:
            split = plan.split_of(name)
        tensors[name] = merge_tp_slices(slices, split.tp_dim, split.tp_stride, name)
    buffers: dict[str, torch.Tensor] = {}
    if pipelined or moe:  # the router's score_bias: a buffer, in no parameter list
        with weights_only_loading(allow_pickle):
            buffers = read_buffers(folder, manifest, allow_pickle)
        buffers = {n: t.float() for n, t in buffers.items()}
    leftover = {n for w in ranks for n in w if not n.endswith(EXTRA_STATE)} - set(buffers)
    if leftover:
        log.warning("not parameters, left out: %s", ", ".join(sorted(leftover)))
    return manifest, tensors | buffers


def _write(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], out: Path, force: bool
) -> None:
    """Write next to `out` and rename: a reader never sees half a file. Its mode is that of a
    file created with 0666 under the user's umask (safetensors itself writes 0600); without
    `force` the last step is a hard link, which fails if `out` appeared meanwhile."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = stat.S_IMODE(tmp.stat().st_mode)  # what the umask made of 0666
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, mode)
        if force:
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)
            except FileExistsError:
                raise ScaletrainError(f"{out} exists; pass --force to replace it") from None
    finally:
        tmp.unlink(missing_ok=True)


def _stage_weights(
    folder: Path, tp_rank: int, layers: list[str], allow_pickle: bool
) -> dict[str, torch.Tensor]:
    """One TP rank's fp32 weights of every pipeline stage, from DeepSpeed's per-layer files
    (`layer_XX-model_RR-model_states.pt`), under the whole model's names."""
    import torch

    weights: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob(f"layer_*-model_{tp_rank:02d}-model_states.pt")):
        index = int(path.name.split("-")[0].removeprefix("layer_"))
        for key, value in load(path, allow_pickle, CLI_OPT_IN).items():
            if torch.is_tensor(value) and not key.endswith(EXTRA_STATE):
                weights[f"{layers[index]}.{key}"] = value.float()
    if not weights:
        raise ScaletrainError(f"{folder}: no pipeline layer files of TP rank {tp_rank}")
    return weights


def _moe_weights(folder: Path, tp_rank: int, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """One TP rank's fp32 weights of an MoE checkpoint (ZeRO <= 2 keeps them whole in the
    module): the dense ones from its model-states file, every expert from DeepSpeed's
    per-expert files (`layer_L_expert_E_mp_rank_RR_model_states.pt`, global expert names)."""
    import torch

    path = folder / f"mp_rank_{tp_rank:02d}_model_states.pt"
    if not path.is_file():
        raise ScaletrainError(f"{path} is missing")
    module = load(path, allow_pickle, CLI_OPT_IN)["module"]
    weights = {
        name: value.float()
        for name, value in module.items()
        if torch.is_tensor(value) and not name.endswith(EXTRA_STATE) and EXPERTS not in name
    }
    experts = sorted(folder.glob(f"layer_*_expert_*_mp_rank_{tp_rank:02d}_model_states.pt"))
    if not experts:
        raise ScaletrainError(f"{folder}: no expert files of TP rank {tp_rank}")
    for expert in experts:
        for name, value in load(expert, allow_pickle, CLI_OPT_IN).items():
            if torch.is_tensor(value) and not name.endswith(EXTRA_STATE):
                weights[name] = value.float()
    return weights


def _tp_rank_weights(
    folder: Path, tp_rank: int, zero_stage: int, allow_pickle: bool
) -> dict[str, torch.Tensor]:
    """Full-over-DP fp32 weights of one TP rank, named as the model's parameters."""

    if zero_stage == 0:
        return _zero0_weights(folder / f"mp_rank_{tp_rank:02d}_model_states.pt", allow_pickle)
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


def _zero0_weights(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """ZeRO-0 has no optimizer shards: the module holds the fp32 weights, or, in bf16/fp16,
    DeepSpeed's mixed-precision optimizer holds the fp32 master copies in its groups."""
    import torch

    if not path.is_file():
        raise ScaletrainError(f"{path} is missing")
    state = load(path, allow_pickle, CLI_OPT_IN)
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
