"""Resume across `parallel.pp` and `parallel.ep`: a universal copy we write, DeepSpeed loads.

DeepSpeed 0.19's `ds_to_universal` reads a pipeline's optimizer partitions, but keeps their
layer-index names (`3.attn.qkv.weight`), so the copy only loads into the same pipeline split; and
it merges the expert partitions of different expert-parallel ranks as if they were DP slices of
one tensor (its expert support is for AutoEP's stacked experts). So for a pipeline or MoE
checkpoint on either side we write DeepSpeed's universal layout ourselves, from the whole
tensors `zero_state` reads, under the names the new engine's parameters have:

    zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt   {"param": full tensor, "cat_dim", ...}
    zero/optimizer_state.pt                          param groups, loss scaler, clipping
    mp_rank_00_model_states.pt                       LR schedule, step counters; "module": the
                                                     buffers (router bias) under the new names

The engine's own universal loader (`checkpoint.load_universal`) then cuts its TP slice and ZeRO
partition from each, with `cat_dim` / `param_n_sub_params` taken from the split plan. Names:
a pipeline target gets layer-index names; an MoE target one view per expert-parallel rank
(`ep_rank_R/`), whose `zero/` links rank R's local expert ids to the global experts in
`experts/` and the dense entries to `zero/` (links keep the copy one set of files); both for
MoE x pipeline. A stage without MoE blocks has only the dense optimizer groups, a prefix of the
full list written here (DeepSpeed appends the expert groups). ZeRO-0 and ZeRO-3 are refused on
either side (`convert.check_reshardable`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from scaletrain.checkpoint.manifest import Manifest
from scaletrain.checkpoint.safe_load import load
from scaletrain.checkpoint.zero_state import (
    EXPERTS,
    STATES,
    ZeroState,
    expert_id,
    expert_name,
    pipeline_name,
    read_buffers,
    read_zero_state,
)
from scaletrain.models.registry import pipeline_layer_names, saved_model_config
from scaletrain.models.split_plan import Split

EXPERT_DIR = "experts"
MODEL_STATES = "mp_rank_00_model_states.pt"


def needs_own_conversion(saved: dict[str, Any], current: dict[str, Any], moe: bool) -> bool:
    """True when DeepSpeed's converter cannot serve: pipelines or experts on either side."""
    sides = (saved, current)
    return moe or any(side.get("pp", 1) > 1 or side.get("ep", 1) > 1 for side in sides)


def target_of(current: dict[str, Any], moe: bool) -> dict[str, Any]:
    """What the copy's names depend on (recorded beside it, so a later run reuses it)."""
    return {"pipelined": current.get("pp", 1) > 1, "ep": current.get("ep", 1), "moe": moe}


def view_of(out: Path, target: dict[str, Any], dp_rank: int) -> Path:
    """The folder a rank loads: the copy, or its expert-parallel rank's view of it."""
    return out / f"ep_rank_{dp_rank % target['ep']}" if target["moe"] else out


def write_universal(
    folder: Path, out: Path, target: dict[str, Any], allow_pickle: bool = False
) -> None:
    """Write the universal copy of `folder` for a run of layout `target` into `out` (new)."""
    manifest = Manifest.read(folder)
    assert manifest is not None  # the manager verified it
    state = read_zero_state(folder, manifest, allow_pickle)
    cfg = saved_model_config(manifest.data.get("config") or {})
    layers = pipeline_layer_names(cfg) if target["pipelined"] else None
    zero = out / "zero"
    zero.mkdir(parents=True)
    for name, tensors in state.tensors.items():
        if EXPERTS in name:
            where = out / EXPERT_DIR / name
        else:
            where = zero / (pipeline_name(name, layers, cfg.tie_embeddings) if layers else name)
        _write_param(where, tensors, state.splits[name], state.step)
    saved_ep = int(manifest.data["layout"].get("ep", 1))
    torch.save(_optimizer_state(state, saved_ep, target["ep"]), zero / "optimizer_state.pt")
    model_states = load(folder / MODEL_STATES, allow_pickle)
    # The universal loader restores parameters from zero/ and never reads the module state;
    # the buffers, every stage's, under the new names, are restored from here
    # (`convert.restore_buffers`).
    buffers = read_buffers(folder, manifest, allow_pickle)
    model_states["module"] = {
        (pipeline_name(name, layers) if layers else name): tensor
        for name, tensor in buffers.items()
    }
    model_states["mp_world_size"] = 1  # the one file here (DeepSpeed counts them)
    torch.save(model_states, out / MODEL_STATES)
    if target["moe"]:
        _expert_views(out, state, cfg.num_experts, target["ep"], layers)


def _write_param(
    where: Path, tensors: dict[str, torch.Tensor], split: Split, step: torch.Tensor | None
) -> None:
    """One parameter as DeepSpeed's universal loader reads it: the full tensor and how to cut
    it over TP (a gate|up fusion is two sub-parameters, each cut along dim 0)."""
    from deepspeed.checkpoint.constants import CAT_DIM, PARAM, PARAM_N_SUB_PARAMS

    where.mkdir(parents=True)
    for state in STATES:
        entry: dict[str, Any] = {PARAM: tensors[state].contiguous(), CAT_DIM: split.tp_dim or 0}
        if split is Split.GATE_UP:
            entry[PARAM_N_SUB_PARAMS] = 2
        torch.save(entry, where / f"{state}.pt")
    if step is not None:
        torch.save(step.clone(), where / "step.pt")


def _optimizer_state(state: ZeroState, saved_ep: int, ep: int) -> dict[str, Any]:
    """The optimizer's global state; DeepSpeed copies every group field but `params` into the
    new engine's groups, so the expert group keeps the new layout's name (`ep_size_N`)."""
    from deepspeed.checkpoint.constants import PARAM_GROUPS

    groups = []
    for group in state.param_groups:
        group = {k: v for k, v in group.items() if k != "params"}
        if group.get("moe"):
            group["name"] = re.sub(rf"^ep_size_{saved_ep}$", f"ep_size_{ep}", group["name"])
        groups.append(group | {"params": []})
    return {**state.optimizer_globals, PARAM_GROUPS: groups}


def _expert_views(
    out: Path, state: ZeroState, num_experts: int, ep: int, layers: list[str] | None
) -> None:
    """`ep_rank_R/`: rank R's local expert names (layer-index names for a pipelined target)
    linked to their global entries, the dense ones and the global files linked as they are
    (relative links: the copy can be renamed)."""
    local = num_experts // ep
    experts = [n for n in state.tensors if EXPERTS in n]
    for rank in range(ep):
        view = out / f"ep_rank_{rank}"
        (view / "zero").mkdir(parents=True)
        os.link(out / MODEL_STATES, view / MODEL_STATES)
        for entry in (out / "zero").iterdir():
            target = Path("..", "..", "zero", entry.name)
            if entry.is_dir():
                (view / "zero" / entry.name).symlink_to(target, target_is_directory=True)
            else:
                os.link(entry, view / "zero" / entry.name)
        for name in experts:
            if expert_id(name) // local != rank:
                continue
            mine = expert_name(name, -rank * local)
            mine = pipeline_name(mine, layers) if layers else mine
            target = Path("..", "..", EXPERT_DIR, name)
            (view / "zero" / mine).symlink_to(target, target_is_directory=True)
