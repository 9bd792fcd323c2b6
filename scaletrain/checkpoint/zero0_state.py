"""The fp32 master weights of a bf16 or fp16 pipeline or MoE checkpoint saved at ZeRO-0.

ZeRO-0 writes no ZeRO partitions, so `zero_state` has nothing to read. DeepSpeed 0.19 wraps the
optimizer in a mixed-precision one of its own (`DeepSpeedEngine._do_optimizer_sanity_check`),
and each keeps its fp32 masters somewhere else:

- bf16 with a pipeline: `BF16_Optimizer`. Every rank writes
  `bf16_zero_pp_rank_D_mp_rank_MM_optim_states.pt`, its DP slice of each group's flat fp32 master
  with the map from pipeline names to offsets (`param_slice_mappings`), as ZeRO-1 does; but the
  model-states files have no `param_shapes`: shapes come from the per-layer files (with MoE
  blocks: each stage's module state and its expert files, which number experts globally).
- fp16 with a pipeline, bf16 (DeepSpeed's `DDP_BFLOAT16`) and fp16 without one:
  `FP16_UnfusedOptimizer` (torch's AdamW is not DeepSpeed's fused Adam). Its `fp32_groups` hold
  one fp32 tensor per parameter, unnamed, in the order of our optimizer's groups
  (`scaletrain.engine.deepspeed.param_groups`: matrices, then vectors, in model order, then
  DeepSpeed's expert groups, `moe: True`, likewise). A pipeline stage keeps them in its
  `mp_rank_MM_model_states.pt` (a stage's parameters: a tied embedding first, then its layers,
  whose boundaries the group sizes give); an MoE run (each stage of one) each expert-parallel
  rank's in `expp_rank_R_mp_rank_MM_optim_states.pt`, its experts under local ids e (global
  R * E/ep + e), their names and shapes in the expert files.

The result is named as the whole model (global expert ids), TP slices merged by the split plan.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch

from scaletrain.checkpoint.manifest import Manifest
from scaletrain.checkpoint.safe_load import CLI_OPT_IN, load
from scaletrain.checkpoint.zero_state import EXPERTS, OPTIM_FILE, expert_name, whole_name
from scaletrain.errors import ScaletrainError
from scaletrain.models.registry import pipeline_layer_names, saved_model_config, saved_split_plan
from scaletrain.models.split_plan import check_saved_split, merge_tp_slices

EXTRA_STATE = "._extra_state"
LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")
EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt")

Shapes = dict[str, torch.Size]  # one TP rank's parameter name -> shape, in model order


def zero0_masters(
    folder: Path, manifest: Manifest, allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """The whole fp32 masters of a bf16/fp16 pipeline or MoE checkpoint saved at ZeRO-0."""
    layout = manifest.data["layout"]
    cfg = saved_model_config(manifest.data.get("config") or {})
    tp, pp, ep = int(layout["tp"]), int(layout.get("pp", 1)), int(layout.get("ep", 1))
    local = cfg.num_experts // ep  # experts per EP rank
    layers = pipeline_layer_names(cfg) if pp > 1 else []
    bf16_files = any(folder.glob("bf16_zero_pp_rank_*_optim_states.pt"))
    ranks = []
    for t in range(tp):
        model_ranks = [s * tp + t for s in range(pp)]  # this TP rank's file of each stage
        if bf16_files:  # a pipeline in bf16
            files = _layer_files(folder, t, layers, allow_pickle)
            shapes = {n: s for layer in files.values() for n, s in layer.items()}
            for m in model_ranks if local else []:
                # A stage with MoE blocks keeps its module in the model-states file instead.
                stage = _moe_files(folder, m, local, allow_pickle)[2]
                shapes |= {whole_name(n, layers): shape for n, shape in stage.items()}
            ranks.append(_bf16_partitions(folder, t, tp, ep, local, layers, shapes, allow_pickle))
        elif local:  # MoE in bf16 without pipeline, or in fp16
            masters = {}
            for m in model_ranks:
                stage = _moe_masters(folder, m, ep, local, allow_pickle)
                masters |= {whole_name(n, layers) if layers else n: v for n, v in stage.items()}
            ranks.append(masters)
        else:  # a pipeline in fp16
            files = _layer_files(folder, t, layers, allow_pickle)
            if not files:
                raise ScaletrainError(f"{folder}: no pipeline layer files of TP rank {t}")
            stages = [folder / f"mp_rank_{m:02d}_model_states.pt" for m in model_ranks]
            ranks.append(_stage_groups(stages, files, cfg.tie_embeddings, allow_pickle))
    return _merge_tp(folder, manifest, ranks, layers)


def _layer_files(
    folder: Path, tp_rank: int, layers: list[str], allow_pickle: bool
) -> dict[int, Shapes]:
    """Every pipeline layer's parameter shapes (whole-model names) from its file, by index
    (none for the layers of a stage with MoE blocks)."""
    files = sorted(
        (int(m.group(1)), path)
        for path in folder.glob(f"layer_*-model_{tp_rank:02d}-model_states.pt")
        if (m := LAYER_FILE.fullmatch(path.name))
    )
    shapes: dict[int, Shapes] = {}
    for index, path in files:
        saved = load(path, allow_pickle, CLI_OPT_IN)
        shapes[index] = {
            f"{layers[index]}.{key}": value.shape
            for key, value in saved.items()
            if torch.is_tensor(value) and not key.endswith(EXTRA_STATE)
        }
    return shapes


def _bf16_partitions(
    folder: Path,
    tp_rank: int,
    tp: int,
    ep: int,
    local: int,
    layers: list[str],
    shapes: Shapes,
    allow_pickle: bool,
) -> dict[str, torch.Tensor]:
    """One TP rank's fp32 masters from `BF16_Optimizer`'s files: each stage's fragments joined
    in DP-rank order (DP rank D holds local experts of EP rank D % ep). A tied weight is in two
    stages, equal: the first stage's is taken."""
    files = sorted(
        (int(m.group(2)) // tp, int(m.group(1)), path)
        for path in folder.glob("bf16_zero_pp_rank_*_optim_states.pt")
        if (m := OPTIM_FILE.fullmatch(path.name)) and int(m.group(2)) % tp == tp_rank
    )
    pieces: dict[int, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    for stage, dp_rank, path in files:  # DP ranks ascending within each stage
        saved = load(path, allow_pickle, CLI_OPT_IN)["optimizer_state_dict"]
        flats = saved["single_partition_of_fp32_groups"]
        for flat, mapping in zip(flats, saved["param_slice_mappings"], strict=True):
            for name, fragment in mapping.items():
                part = flat.narrow(0, fragment.start, fragment.numel)
                whole = whole_name(name, layers)
                if EXPERTS in whole:
                    whole = expert_name(whole, (dp_rank % ep) * local)
                pieces[stage][whole].append(part)
    masters: dict[str, torch.Tensor] = {}
    for stage in sorted(pieces):
        for name, parts in pieces[stage].items():
            if name in masters:
                continue
            if name not in shapes:
                raise ScaletrainError(f"{folder}: {name} has fp32 masters but no layer file")
            flat, shape = torch.cat(parts), shapes[name]
            if flat.numel() != shape.numel():
                raise ScaletrainError(
                    f"{folder}: {name} of TP rank {tp_rank} has {flat.numel()} fp32 master "
                    f"elements, its shape {list(shape)} needs {shape.numel()}"
                )
            masters[name] = flat.view(shape).clone()
    return masters


def _stage_groups(
    stages: list[Path], files: dict[int, Shapes], tied: bool, allow_pickle: bool
) -> dict[str, torch.Tensor]:
    """One TP rank's fp32 masters from each stage's `FP16_UnfusedOptimizer` groups. A stage
    holds the tied embedding (first and last stage) and then the next layers, as many as fill
    its groups (the pipeline cuts the layer list into runs)."""
    shapes = {n: s for layer in files.values() for n, s in layer.items()}
    tied_names = list(files.get(0, {})) if tied else []
    left = [list(layer) for index, layer in sorted(files.items()) if not (tied and index == 0)]
    masters: dict[str, torch.Tensor] = {}
    for s, path in enumerate(stages):
        groups, moe = _fp32_groups(path, allow_pickle)
        sizes = [len(g) for g in groups]
        names = list(tied_names) if s in (0, len(stages) - 1) else []
        while left and sum(sizes) > len(names):
            names += left.pop(0)
        masters.update(_name(path, names, [], shapes, groups, moe))
    if left:
        raise ScaletrainError(f"{stages[-1].parent}: no fp32 masters for {left[0][0]}")
    return masters


def _moe_files(
    folder: Path, model_rank: int, local: int, allow_pickle: bool
) -> tuple[list[str], dict[int, list[str]], Shapes]:
    """One model rank's dense parameter names (its module state, in model order), each EP
    rank's expert names (the expert files, global ids) and the shapes of all of them."""
    path = folder / f"mp_rank_{model_rank:02d}_model_states.pt"
    if not path.is_file():
        raise ScaletrainError(f"{path} is missing")
    saved = load(path, allow_pickle, CLI_OPT_IN)
    buffers = set(saved.get("buffer_names") or [])
    shapes = {
        name: value.shape
        for name, value in (saved.get("module") or {}).items()
        if torch.is_tensor(value)
        and not name.endswith(EXTRA_STATE)
        and name not in buffers
        and EXPERTS not in name
    }
    dense = list(shapes)
    experts: dict[int, list[str]] = defaultdict(list)
    files = sorted(  # by MoE layer, then expert: the model's order
        (int(m.group(1)), int(m.group(2)), path)
        for path in folder.glob(f"layer_*_expert_*_mp_rank_{model_rank:02d}_model_states.pt")
        if (m := EXPERT_FILE.fullmatch(path.name))
    )
    for _, expert, path in files:
        for name, value in load(path, allow_pickle, CLI_OPT_IN).items():
            if torch.is_tensor(value) and not name.endswith(EXTRA_STATE):
                shapes[name] = value.shape
                experts[expert // local].append(name)
    return dense, experts, shapes


def _moe_masters(
    folder: Path, model_rank: int, ep: int, local: int, allow_pickle: bool
) -> dict[str, torch.Tensor]:
    """One model rank's fp32 masters from `FP16_UnfusedOptimizer` in an MoE run: the dense ones
    from EP rank 0's groups, each EP rank's experts from its own."""
    dense, experts, shapes = _moe_files(folder, model_rank, local, allow_pickle)
    masters: dict[str, torch.Tensor] = {}
    for rank in range(ep):
        path = folder / f"expp_rank_{rank}_mp_rank_{model_rank:02d}_optim_states.pt"
        if not path.is_file():
            raise ScaletrainError(f"{path} is missing")
        groups, moe = _fp32_groups(path, allow_pickle)
        named = _name(path, dense, experts[rank], shapes, groups, moe)
        masters.update({n: t for n, t in named.items() if rank == 0 or EXPERTS in n})
    return masters


def _fp32_groups(path: Path, allow_pickle: bool) -> tuple[list[list[torch.Tensor]], list[bool]]:
    """DeepSpeed's FP16 optimizer's fp32 masters (one tensor per parameter) and, per group,
    whether it is an expert group."""
    optimizer = load(path, allow_pickle, CLI_OPT_IN).get("optimizer") or {}
    groups = optimizer.get("fp32_groups")
    if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
        raise ScaletrainError(f"{path}: no fp32 master groups (DeepSpeed's `fp32_groups`)")
    saved_groups = optimizer["optimizer_state_dict"]["param_groups"]
    return groups, [bool(g.get("moe")) for g in saved_groups]


def _name(
    path: Path,
    dense: list[str],
    experts: list[str],
    shapes: Shapes,
    groups: list[list[torch.Tensor]],
    moe: list[bool],
) -> dict[str, torch.Tensor]:
    """Name the groups: dense ones take the dense parameters, expert groups the experts', each
    in our optimizer's order (matrices, then vectors)."""
    queues = {
        kind: _matrices_first(names, shapes) for kind, names in ((False, dense), (True, experts))
    }
    named = {}
    for group, is_moe in zip(groups, moe, strict=True):
        names, queues[is_moe] = queues[is_moe][: len(group)], queues[is_moe][len(group) :]
        got = [tuple(t.shape) for t in group]
        if got != [tuple(shapes[n]) for n in names]:
            raise ScaletrainError(f"{path}: the fp32 master shapes do not match the parameters'")
        named.update({n: t.float() for n, t in zip(names, group, strict=True)})
    left = queues[False] + queues[True]
    if left:
        raise ScaletrainError(f"{path}: no fp32 master for {left[0]}")
    return named


def _matrices_first(names: list[str], shapes: Shapes) -> list[str]:
    return [n for n in names if len(shapes[n]) >= 2] + [n for n in names if len(shapes[n]) < 2]


def _merge_tp(
    folder: Path, manifest: Manifest, ranks: list[dict[str, torch.Tensor]], layers: list[str]
) -> dict[str, torch.Tensor]:
    """Each parameter's TP slices merged by the split the manifest recorded (the plan's for the
    experts of other EP ranks, which the manifest does not list)."""
    plan = saved_split_plan(manifest.data)
    recorded = manifest.data.get("parameters") or {}
    if layers:
        recorded = {whole_name(n, layers): info for n, info in recorded.items()}
    missing = sorted(set(recorded) - set(ranks[0]))
    if missing:
        raise ScaletrainError(f"{folder}: no fp32 masters for {missing[0]}")
    merged = {}
    for name, first in ranks[0].items():
        info = recorded.get(name)
        if info and list(first.shape) != list(info["shape"]):
            raise ScaletrainError(
                f"{folder}: {name} has shape {list(first.shape)}, the manifest says {info['shape']}"
            )
        slices = []
        for rank, weights in enumerate(ranks):
            if name not in weights:
                raise ScaletrainError(f"{folder}: {name} is not in the masters of TP rank {rank}")
            slices.append(weights[name])
        if info:
            split = check_saved_split(plan, name, info["tp_dim"], info["tp_stride"])
        else:
            split = plan.split_of(name)
        merged[name] = merge_tp_slices(slices, split.tp_dim, split.tp_stride, name)
    return merged
