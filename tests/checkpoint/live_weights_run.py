"""Train two steps, save after each, and write the live model's full weights (a test helper).

    torchrun --nproc-per-node N tests/checkpoint/live_weights_run.py --out live.safetensors \
        --config configs/runs/tiny.yaml data.paths=[...] train.run_dir=... parallel.tp=2

The weights written are those of the second (latest) checkpoint, taken from the running
engine: ZeRO-3 partitions gathered with `GatheredParameters`, TP slices all-gathered over the
TP group and merged by megatron-core's split rule, pipeline stages and expert-parallel ranks
gathered under the whole model's names (global expert ids); persistent buffers (the router's
`score_bias`) too. A test compares them with what
`scaletrain ckpt consolidate` makes of the checkpoint on disk.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from scaletrain.checkpoint.consolidate import merge_tp_slices
from scaletrain.checkpoint.zero_state import EXPERTS, expert_name, whole_name
from scaletrain.models.registry import pipeline_layer_names
from scaletrain.train.trainer import Trainer
from tests.trainer_script import trainer_from_argv


def live_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The full (un-sharded) weights of the running model, in its own dtype."""
    params = dict(trainer.engine.module.named_parameters())
    gather = contextlib.nullcontext()
    if trainer.config.parallel.zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None)
    with gather:
        local = {name: p.detach().clone() for name, p in params.items()}
    tp, group = trainer.resolved.dims.tp, trainer.topology.groups.tp
    full = {}
    for name, param in params.items():
        tensor = local[name]
        if tp > 1 and getattr(param, "tensor_model_parallel", False):
            parts = [torch.empty_like(tensor) for _ in range(tp)]
            dist.all_gather(parts, tensor.contiguous(), group=group)
            merged = merge_tp_slices(parts, param.partition_dim, param.partition_stride, name)
            tensor = merged.to(tensor.dtype)
        full[name] = tensor.contiguous()
    # The persistent buffers (the router's score_bias): replicated, in the checkpoint too.
    module = trainer.engine.module
    persistent = set(module.state_dict(keep_vars=True))
    full.update({n: b.detach().clone() for n, b in module.named_buffers() if n in persistent})
    return _whole_model(trainer, full)


def _whole_model(trainer: Trainer, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every stage's and expert-parallel rank's weights under the whole model's names."""
    dims = trainer.resolved.dims
    if dims.pp == 1 and dims.ep == 1:
        return full
    cfg = trainer.config.model
    layers = pipeline_layer_names(cfg) if dims.pp > 1 else None
    local = cfg.num_experts // dims.ep if dims.ep > 1 else 0
    renamed = {}
    for name, tensor in full.items():
        name = whole_name(name, layers) if layers else name
        if local and EXPERTS in name:
            name = expert_name(name, (trainer.topology.dp_rank % dims.ep) * local)
        renamed[name] = tensor
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, renamed)
    return {name: t for part in parts for name, t in part.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="safetensors file for the live weights")
    args, trainer, topology = trainer_from_argv(parser)
    for _ in range(2):
        trainer.train_step()
        trainer.save()
    weights = live_weights(trainer)
    if topology.is_main:
        save_file(weights, args.out)
    dist.barrier()
    topology.destroy()


if __name__ == "__main__":
    main()
