"""The `scaletrain` command.

    scaletrain data prepare --stdlib --output data/stdlib --vocab-size 4096
    scaletrain config check --config configs/runs/quickstart.yaml --world-size 2 parallel.tp=2
    scaletrain config show  --config configs/runs/quickstart.yaml train.steps=20
    scaletrain launch local --nproc 2 --config configs/runs/quickstart.yaml
    torchrun --nproc-per-node 2 -m scaletrain train --config configs/runs/quickstart.yaml
    scaletrain ckpt list runs/quickstart
    scaletrain ckpt verify runs/quickstart/checkpoints/step_00000400
    scaletrain ckpt consolidate runs/quickstart/checkpoints/step_00000400 model.safetensors
    scaletrain scaletest --config configs/runs/tiny.yaml --world-size 4

Errors a user can fix print one line on stderr and exit with status 2; a run stopped by a
signal or its time limit saves a checkpoint and exits with 75 (run it again to resume).
"""

from __future__ import annotations

import argparse
import sys

from scaletrain import plot as plot_command
from scaletrain.data import command as prepare_command
from scaletrain.errors import ScaletrainError
from scaletrain.hf import command as export_command
from scaletrain.plan import command as plan_command


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run YAML, e.g. configs/runs/tiny.yaml")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.field=value", help="e.g. parallel.tp=2"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scaletrain", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train (run under torchrun for several ranks)")
    _add_config_args(train)

    config = commands.add_parser("config", help="show or check a config")
    config_cmds = config.add_subparsers(dest="action", required=True)
    show = config_cmds.add_parser("show", help="print the resolved YAML")
    _add_config_args(show)
    check = config_cmds.add_parser("check", help="validate for a world size, start nothing")
    _add_config_args(check)
    check.add_argument("--world-size", type=int, required=True, help="number of ranks")
    check.add_argument(
        "--run-dir",
        help="also check resuming this run folder (sets train.run_dir): refuses what its "
        "newest checkpoint cannot continue",
    )
    config_cmds.add_parser("reference", help="print the markdown reference of every field")

    data = commands.add_parser("data", help="prepare token shards")
    data_cmds = data.add_subparsers(dest="action", required=True)
    prepare_command.add_parser(data_cmds)

    launch = commands.add_parser("launch", help="start training on this machine or a cluster")
    launch_cmds = launch.add_subparsers(dest="action", required=True)
    local = launch_cmds.add_parser(
        "local", help="torchrun on this machine; exit 0 done, 75 stopped resumably"
    )
    local.add_argument("--nproc", type=int, required=True, help="ranks to start")
    _add_config_args(local)
    slurm = launch_cmds.add_parser(
        "slurm", help="write (and submit) an sbatch job from the run config and a cluster file"
    )
    _add_config_args(slurm)
    slurm.add_argument(
        "--cluster", required=True, help="configs/clusters/NAME or a path; cluster.f=v overrides"
    )
    slurm.add_argument("--nodes", type=int, help="nodes (default: the cluster file's nodes)")
    slurm.add_argument("--chain", type=int, default=1, help="K jobs, each after the one before")
    how = slurm.add_mutually_exclusive_group()
    how.add_argument("--dry-run", action="store_true", help="print script, sbatch; write nothing")
    how.add_argument("--submit", action="store_true", help="write the files and sbatch them")
    slurm.add_argument(
        "--no-plan-check",
        action="store_true",
        help="submit even when `scaletrain plan` says the layout does not fit cluster.gpu",
    )
    status = launch_cmds.add_parser("status", help="a run's SLURM jobs, restarts, step, loss")
    status.add_argument("run_dir", help="the run folder (train.run_dir)")

    ckpt = commands.add_parser("ckpt", help="list, verify and consolidate checkpoints")
    ckpt_cmds = ckpt.add_subparsers(dest="action", required=True)
    listing = ckpt_cmds.add_parser(
        "list", help="every checkpoint of a run, each file checked (exit 1 if one is corrupt)"
    )
    listing.add_argument("path", help="a run folder or its checkpoints folder")
    verify = ckpt_cmds.add_parser("verify", help="check one checkpoint against its manifest")
    verify.add_argument("path", help="a checkpoint folder, e.g. runs/x/checkpoints/step_00000120")
    merge = ckpt_cmds.add_parser(
        "consolidate", help="write the full fp32 weights (TP merged) as one safetensors file"
    )
    merge.add_argument("path", help="a checkpoint folder")
    merge.add_argument(
        "out", help="the .safetensors file to write (not inside a run's checkpoints folder)"
    )
    merge.add_argument("--force", action="store_true", help="replace OUT if it exists")
    merge.add_argument(
        "--allow-pickle",
        action="store_true",
        help="fully unpickle files that weights-only loading refuses (can run code: trusted "
        "files only)",
    )
    plan_command.add_parser(commands)
    plot_command.add_parser(commands)
    export_command.add_parser(commands)
    scaletest = commands.add_parser(
        "scaletest", help="train every layout of N ranks for K steps and compare with one rank"
    )
    _add_config_args(scaletest)
    scaletest.add_argument("--world-size", type=int, required=True, help="simulated ranks")
    scaletest.add_argument("--steps", type=int, default=6, help="steps per layout (K)")
    scaletest.add_argument(
        "--layouts", help="comma-separated, e.g. tp2pp1dp1,tp1pp1dp2z1 (default: every valid one)"
    )
    scaletest.add_argument(
        "--tolerance",
        type=float,
        help="largest relative loss difference (default by precision.dtype: fp32 1e-5, bf16 and "
        "fp16 1e-3)",
    )
    scaletest.add_argument(
        "--explain", action="store_true", help="list the rejected layouts with the reason"
    )
    scaletest.add_argument(
        "--reference", help="compare with this existing single-rank run dir instead of training one"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ScaletrainError as err:
        print(str(err).splitlines()[0], file=sys.stderr)
        return err.exit_code


def _dispatch(args: argparse.Namespace) -> int:
    from scaletrain.config import dump_yaml, load_config

    if args.command == "config" and args.action == "reference":
        from scaletrain.config.reference import config_reference

        print(config_reference(), end="")
        return 0
    if args.command == "config":
        config = load_config(args.config, args.overrides)
        if args.action == "show":
            print(dump_yaml(config), end="")
            return 0
        from scaletrain.train.preflight import preflight, resume_summary

        if args.run_dir:
            config.train.run_dir = args.run_dir
        checked = preflight(config, args.world_size, compare=bool(args.run_dir))
        resolved = checked.resolved
        print(
            f"ok: {resolved.dims.describe()} on {args.world_size} rank(s), global batch "
            f"{resolved.global_batch} = micro {resolved.micro_batch} x accum "
            f"{resolved.grad_accum} x dp {resolved.dims.dp}, vocab {resolved.vocab_size} "
            f"(padded {resolved.padded_vocab_size})"
        )
        if args.run_dir:
            print("\n".join(resume_summary(config, checked)))
        return 0
    if args.command == "train":
        from scaletrain.launch.outcome import recorded_exit
        from scaletrain.logs import setup_logging
        from scaletrain.train.preflight import preflight, rank_world_size

        setup_logging()

        with recorded_exit():  # the code and line for the launcher: torchrun says 1
            config = load_config(args.config, args.overrides)
            checked = preflight(config, rank_world_size())  # refusals before DeepSpeed loads
            from scaletrain.train.trainer import train

            train(config, checked)
        return 0
    if args.command == "data":
        return prepare_command.run(args)
    if args.command == "ckpt":
        return _ckpt(args)
    if args.command == "scaletest":
        from scaletrain.logs import setup_logging
        from scaletrain.scaletest.run import scaletest

        setup_logging()
        return scaletest(
            args.config,
            args.overrides,
            args.world_size,
            steps=args.steps,
            layouts=args.layouts,
            tolerance=args.tolerance,
            explain=args.explain,
            reference=args.reference,
        )
    if args.command == "plan":
        return plan_command.run(args)
    if args.command == "plot":
        return plot_command.run(args)
    if args.command == "export":
        return export_command.run(args)
    if args.command == "launch":
        from scaletrain.launch.commands import launch

        return launch(args)
    raise AssertionError(args)


def _ckpt(args: argparse.Namespace) -> int:
    from pathlib import Path

    from scaletrain.checkpoint import tools

    if args.action == "list":
        listing = tools.list_run(Path(args.path))
        print("\n".join(tools.format_listing(listing)))
        return 1 if listing.corrupt else 0
    if args.action == "verify":
        manifest = tools.verify(Path(args.path))
        print(
            f"ok: {args.path} step {manifest.step}, {len(manifest.files)} files, "
            f"{manifest.total_bytes / 1e6:.1f} MB"
        )
        return 0
    from scaletrain.checkpoint.consolidate import consolidate
    from scaletrain.logs import setup_logging

    setup_logging()
    done = consolidate(
        Path(args.path), Path(args.out), allow_pickle=args.allow_pickle, force=args.force
    )
    print(
        f"wrote {done.out}: {done.tensors} tensors, {done.parameters:,} parameters (fp32), "
        f"{done.bytes / 1e6:.1f} MB, step {done.step}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
