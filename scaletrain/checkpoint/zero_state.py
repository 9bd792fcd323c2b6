"""A ZeRO-1/2 checkpoint's fp32 master weights and Adam moments, whole, by the model's names.

Pipeline and MoE checkpoints keep their fp32 masters only in DeepSpeed's optimizer partitions
(`[bf16_]zero_pp_rank_D_mp_rank_MM_optim_states.pt`), which neither `zero_to_fp32` nor
`ds_to_universal` read right for them: a pipeline names its parameters by layer index
(`3.attn.qkv.weight`), and each expert-parallel rank names its own experts 0..E/ep-1. This
module reads every partition through the map DeepSpeed stores beside it (`param_slice_mappings`:
name -> offset and length in that rank's flat partition) and gives each parameter its whole
model name (`blocks.2.attn.qkv.weight`, global expert ids), merged over TP with the family's
split plan. `ckpt consolidate` takes the fp32 masters from it; resharding across `pp` and `ep`
(`layout_convert`) takes everything. Buffers (the router's `score_bias`) are in no partition:
`read_buffers` takes them from the model-states files.

Rank numbering, as DeepSpeed writes it: `MM` is the rank in the pipeline's model group
(stage * tp + tp rank; the TP rank without pipelines); `D` the data-parallel rank, whose
expert-parallel rank is `D % ep` (DeepSpeed's expert groups are runs of `ep` DP ranks), so the
global id of its local expert `e` is `(D % ep) * (num_experts / ep) + e`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scaletrain.checkpoint.manifest import Manifest
from scaletrain.checkpoint.safe_load import load
from scaletrain.errors import ScaletrainError
from scaletrain.models.registry import pipeline_layer_names, saved_model_config, saved_split_plan
from scaletrain.models.split_plan import Split, check_saved_split, merge_tp_slices

STATES = ("fp32", "exp_avg", "exp_avg_sq")
EXPERTS = ".deepspeed_experts."
OPTIM_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
TIED = "tied_modules."  # where a PipelineModule keeps a TiedLayerSpec's module
EXPERT_ID = re.compile(r"\.deepspeed_experts\.(\d+)\.")


@dataclass
class ZeroState:
    """Every parameter's full tensors (`STATES`), the Adam step and the optimizer's groups."""

    tensors: dict[str, dict[str, torch.Tensor]]
    splits: dict[str, Split]
    step: torch.Tensor | None
    param_groups: list[dict[str, Any]]
    optimizer_globals: dict[str, Any] = field(default_factory=dict)
    """The optimizer file's unsharded entries (loss scaler, clipping): DeepSpeed restores them."""


def whole_name(name: str, layers: list[str]) -> str:
    """A pipeline parameter name (`<layer index>.<rest>`; a tied embedding's
    `tied_modules.embedding.<rest>`, DeepSpeed's key of a `TiedLayerSpec`) as the whole
    model's; a name that is already one (no layer index) is returned as it is."""
    if name.startswith(TIED):
        return name.removeprefix(TIED)
    index, rest = name.split(".", 1)
    return f"{layers[int(index)]}.{rest}" if index.isdigit() else name


def pipeline_name(name: str, layers: list[str], tied: bool = False) -> str:
    """The inverse of `whole_name` (`tied`: the model ties its embedding, which a pipeline
    keeps as a tied module): the layer whose name prefixes `name` the longest."""
    if tied and name.startswith("embedding."):
        return TIED + name
    matches = [i for i, layer in enumerate(layers) if name.startswith(layer + ".")]
    if not matches:
        raise ScaletrainError(f"{name}: no pipeline layer holds it")
    index = max(matches, key=lambda i: len(layers[i]))
    return f"{index}.{name[len(layers[index]) + 1 :]}"


def expert_name(name: str, offset: int) -> str:
    """`name` with its expert id moved by `offset` (local <-> global ids)."""
    return EXPERT_ID.sub(lambda m: f".deepspeed_experts.{int(m.group(1)) + offset}.", name, 1)


def expert_id(name: str) -> int:
    match = EXPERT_ID.search(name)
    assert match is not None, name
    return int(match.group(1))


def read_zero_state(
    folder: Path, manifest: Manifest, allow_pickle: bool = False, states: tuple[str, ...] = STATES
) -> ZeroState:
    """The whole tensors of checkpoint `folder` (ZeRO stage 1 or 2, any tp / pp / dp / ep)."""
    layout = manifest.data["layout"]
    if int(layout["zero_stage"]) not in (1, 2):
        raise ScaletrainError(
            f"{folder}: reading the optimizer partitions needs ZeRO stage 1 or 2, it was saved "
            f"at zero_stage={layout['zero_stage']}"
        )
    cfg = saved_model_config(manifest.data.get("config") or {})
    tp, ep = int(layout["tp"]), int(layout.get("ep", 1))
    layers = pipeline_layer_names(cfg) if int(layout.get("pp", 1)) > 1 else None
    local_experts = cfg.num_experts // ep if cfg.num_experts else 0

    def rename(name: str, dp_rank: int) -> str:
        name = whole_name(name, layers) if layers else name
        if EXPERTS in name:
            name = expert_name(name, (dp_rank % ep) * local_experts)
        return name

    files = sorted(
        (int(m.group(2)), int(m.group(1)), path)
        for path in folder.glob("*_optim_states.pt")
        if (m := OPTIM_FILE.fullmatch(path.name))
    )
    if not files:
        raise ScaletrainError(f"{folder}: no ZeRO optimizer partitions")
    # pieces[(whole name, tp rank)][state] = this name's fragments in DP-rank order
    pieces: dict[tuple[str, int], dict[str, list[torch.Tensor]]] = defaultdict(
        lambda: defaultdict(list)
    )
    shapes: dict[tuple[str, int], torch.Size] = {}
    step, groups, optimizer_globals = None, [], {}
    for model_rank in sorted({m for m, _, _ in files}):
        states_file = folder / f"mp_rank_{model_rank:02d}_model_states.pt"
        if not states_file.is_file():
            raise ScaletrainError(f"{states_file} is missing")
        saved_shapes = load(states_file, allow_pickle)["param_shapes"]
        for dp_rank in range(int(layout["dp"])):
            for group in saved_shapes:
                for name, shape in group.items():
                    shapes[(rename(name, dp_rank), model_rank % tp)] = torch.Size(shape)
    for model_rank, dp_rank, path in files:  # DP ranks ascending within each model rank
        saved = load(path, allow_pickle)["optimizer_state_dict"]
        base = saved["base_optimizer_state"]
        if len(base["param_groups"]) > len(groups):
            # A stage without MoE blocks lacks the expert group(s) DeepSpeed appends after the
            # dense ones: the full list is the longest, and every stage's is a prefix of it.
            groups = base["param_groups"]
        if step is None:
            step = base["state"][0].get("step") if base["state"] else None
            sharded = ("base_optimizer_state", "param_slice_mappings")
            sharded += ("single_partition_of_fp32_groups",)
            optimizer_globals = {k: v for k, v in saved.items() if k not in sharded}
        for g, mapping in enumerate(saved["param_slice_mappings"]):
            flat = {"fp32": saved["single_partition_of_fp32_groups"][g]}
            flat.update({k: v for k, v in base["state"].get(g, {}).items() if k != "step"})
            for name, fragment in mapping.items():
                if name.startswith(TIED) and model_rank >= tp:
                    continue  # the last stage's copy of a tied weight: equal to the first's
                key = (rename(name, dp_rank), model_rank % tp)
                for state in states:
                    if state not in flat:
                        raise ScaletrainError(f"{path}: no {state} for {name}")
                    part = flat[state].narrow(0, fragment.start, fragment.numel)
                    pieces[key][state].append(part)
    recorded = manifest.data.get("parameters") or {}  # the split each had at save time
    recorded = {rename(name, 0): info for name, info in recorded.items()}
    return _merge(
        folder, manifest, tp, recorded, pieces, shapes, states, step, groups, optimizer_globals
    )


def read_buffers(
    folder: Path, manifest: Manifest, allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """The model's persistent buffers (the router's `score_bias`) by whole-model name: no
    optimizer partition holds them, DeepSpeed keeps them in the module state of each stage's
    model-states file (`buffer_names`). Each must be one the split plan names replicated; TP
    rank 0's copy is taken."""
    layout = manifest.data["layout"]
    tp, pp = int(layout["tp"]), int(layout.get("pp", 1))
    cfg = saved_model_config(manifest.data.get("config") or {})
    layers = pipeline_layer_names(cfg) if pp > 1 else None
    plan = saved_split_plan(manifest.data)
    buffers: dict[str, torch.Tensor] = {}
    for stage in range(pp):  # model rank stage * tp + tp rank
        path = folder / f"mp_rank_{stage * tp:02d}_model_states.pt"
        if not path.is_file():
            raise ScaletrainError(f"{path} is missing")
        state = load(path, allow_pickle)
        module = state.get("module") or {}
        for name in state.get("buffer_names") or []:
            whole = whole_name(name, layers) if layers else name
            if plan.split_of(whole) is not Split.REPLICATED:
                raise ScaletrainError(f"{path}: buffer {whole} is split over TP; cannot merge it")
            if name not in module:
                raise ScaletrainError(f"{path}: buffer {name} is not in its module state")
            buffers[whole] = module[name]
    return buffers


def _merge(
    folder: Path,
    manifest: Manifest,
    tp: int,
    recorded: dict[str, dict[str, Any]],
    pieces: dict[tuple[str, int], dict[str, list[torch.Tensor]]],
    shapes: dict[tuple[str, int], torch.Size],
    states: tuple[str, ...],
    step: torch.Tensor | None,
    groups: list[dict[str, Any]],
    optimizer_globals: dict[str, Any],
) -> ZeroState:
    """Join each parameter's fragments, then its TP slices, with the split plan's rule."""
    plan = saved_split_plan(manifest.data)
    names = sorted({name for name, _ in pieces})
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    splits: dict[str, Split] = {}
    for name in names:
        info = recorded.get(name)
        # The manifest of an MoE run lists rank 0's experts only; the others follow the plan.
        if info:
            split = check_saved_split(plan, name, info["tp_dim"], info["tp_stride"])
        else:
            split = plan.split_of(name)
        full = {}
        for state in states:
            slices = []
            for rank in range(tp):
                if (name, rank) not in pieces:
                    raise ScaletrainError(
                        f"{folder}: {name} is not in the partitions of TP rank {rank}"
                    )
                flat = torch.cat(pieces[(name, rank)][state]).detach()
                shape = shapes[(name, rank)]
                if flat.numel() != shape.numel():
                    raise ScaletrainError(
                        f"{folder}: {name} of TP rank {rank} has {flat.numel()} elements in its "
                        f"partitions, its shape {list(shape)} needs {shape.numel()}"
                    )
                slices.append(flat.view(shape))
            full[state] = merge_tp_slices(slices, split.tp_dim, split.tp_stride, name)
        tensors[name], splits[name] = full, split
    return ZeroState(tensors, splits, step, groups, optimizer_globals)
