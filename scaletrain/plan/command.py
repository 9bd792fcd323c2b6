"""`scaletrain plan`: per-rank memory, step time and MFU of a config on N devices.

    scaletrain plan --config configs/runs/quickstart.yaml --world-size 64 --gpu H100-SXM
    scaletrain plan --config X --world-size 16384 --gpu H100-SXM --search --top 5 --tokens 15e12
    scaletrain plan --config X --world-size 8 --cluster h100-ib-pyxis --json parallel.tp=8

Runs the same `check_config` as `train` (a bad layout is the usual one-line error, exit 2),
builds no model and no process group, and imports neither DeepSpeed nor megatron-core.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from scaletrain.errors import ConfigError
from scaletrain.resources import CLUSTERS_DIR

DEFAULT_GPU = "H100-SXM"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    plan = subparsers.add_parser(
        "plan", help="predict per-rank memory, step time and MFU of a layout (or search them)"
    )
    plan.add_argument("--config", required=True, help="run YAML, e.g. configs/runs/tiny.yaml")
    plan.add_argument("--world-size", type=int, required=True, help="number of devices (ranks)")
    plan.add_argument(
        "--gpu", help=f"an entry of configs/hardware.yaml (default {DEFAULT_GPU}; beats --cluster)"
    )
    plan.add_argument(
        "--cluster", help="configs/clusters/NAME or a path: its gpu and gpus_per_node"
    )
    plan.add_argument("--search", action="store_true", help="rank every valid layout that fits")
    plan.add_argument("--top", type=int, default=5, help="candidates printed by --search")
    plan.add_argument("--tokens", type=float, help="training tokens: wall time and GPU-hours")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.add_argument(
        "overrides", nargs="*", metavar="section.field=value", help="e.g. parallel.tp=2"
    )


def _cluster_gpu(name: str) -> tuple[str | None, int | None]:
    """The cluster file's `gpu` (if it names one) and `gpus_per_node`, read as plain YAML so
    that planning does not depend on the launch schema."""
    path = Path(name)
    if not path.is_file():
        path = CLUSTERS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError("--cluster", f"cluster file {name!r} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    gpus = raw.get("gpus_per_node")
    return raw.get("gpu"), int(gpus) if gpus is not None else None


def run(args: argparse.Namespace) -> int:
    from scaletrain.config.checks import check_config
    from scaletrain.config.load import load_config
    from scaletrain.plan.hardware import load_hardware
    from scaletrain.plan.planner import format_plan, layout_name, make_plan, plan_json

    if args.world_size < 1:
        raise ConfigError("--world-size", f"must be >= 1, got {args.world_size}")
    if args.top < 1:
        raise ConfigError("--top", f"must be >= 1, got {args.top}")
    if args.tokens is not None and args.tokens <= 0:
        raise ConfigError("--tokens", f"must be > 0, got {args.tokens:g}")
    gpu, per_node = None, None
    if args.cluster:
        gpu, per_node = _cluster_gpu(args.cluster)
    hw = load_hardware(args.gpu or gpu or DEFAULT_GPU, args.world_size, per_node)
    config = load_config(args.config, args.overrides)
    resolved = check_config(config, args.world_size, check_data=bool(config.data.paths))
    own = make_plan(config, resolved, hw)
    if not args.search:
        if args.json:
            print(json.dumps(plan_json(own, args.tokens), indent=1))
        else:
            print("\n".join(format_plan(own, args.tokens)))
        return 0
    from scaletrain.plan.search import search, why_better

    start = time.perf_counter()
    plans, checked, refused = search(config, resolved, args.world_size, hw)
    seconds = time.perf_counter() - start
    top = plans[: args.top]
    reason = why_better(top[0], own) if top else "no layout fits"
    if args.json:
        out = plan_json(own, args.tokens)
        out["candidates"] = [plan_json(p, args.tokens) for p in top]
        out["search"] = {
            "checked": checked,
            "refused": refused,
            "fitting": len(plans),
            "seconds": seconds,
            "reason": reason,
        }
        print(json.dumps(out, indent=1))
        return 0
    lines = format_plan(own, args.tokens)
    lines += [
        "",
        f"search: {checked} candidates, {refused} refused by the config checks, "
        f"{len(plans)} fit ({seconds:.2f} s); top {len(top)} by tokens/s:",
    ]
    for i, p in enumerate(top, 1):
        lines.append(
            f"  {i}. {layout_name(p):<32} {p.tokens_per_sec:>14,.0f} tokens/s  MFU {p.mfu:6.1%}  "
            f"peak {p.largest.total_bytes / 1e9:7.2f} GB"
        )
    lines.append(f"best vs the config's layout: {reason}")
    print("\n".join(lines))
    return 0
