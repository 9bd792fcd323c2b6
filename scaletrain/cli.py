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

from scaletrain.errors import ConfigError, ScaletrainError


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
    config_cmds.add_parser("reference", help="print the markdown reference of every field")

    data = commands.add_parser("data", help="prepare token shards")
    data_cmds = data.add_subparsers(dest="action", required=True)
    prepare = data_cmds.add_parser("prepare", help="tokenize local text into packed shards")
    prepare.add_argument("--input", nargs="*", default=[], help="files, folders or globs")
    prepare.add_argument(
        "--stdlib", action="store_true", help="add this Python's standard library sources"
    )
    prepare.add_argument("--output", required=True, help="folder for shards and metadata")
    source = prepare.add_mutually_exclusive_group()
    source.add_argument("--tokenizer", help="folder with a tokenizer.json to use as is")
    source.add_argument("--vocab-size", type=int, help="train a byte-level BPE of this size")
    prepare.add_argument("--val-fraction", type=float, default=0.05)
    prepare.add_argument("--num-proc", type=int, default=2)
    prepare.add_argument("--text-field", default="text", help="column of jsonl/parquet inputs")
    prepare.add_argument("--seed", type=int, default=1234)

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
    merge.add_argument("out", help="the .safetensors file to write")
    merge.add_argument(
        "--allow-pickle",
        action="store_true",
        help="open a checkpoint outside a run's checkpoints/ folder (pickle: trusted files only)",
    )
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
    from scaletrain.config import check_config, dump_yaml, load_config

    if args.command == "config" and args.action == "reference":
        from scaletrain.config.reference import config_reference

        print(config_reference(), end="")
        return 0
    if args.command == "config":
        config = load_config(args.config, args.overrides)
        if args.action == "show":
            print(dump_yaml(config), end="")
            return 0
        resolved = check_config(config, args.world_size)
        print(
            f"ok: {resolved.dims.describe()} on {args.world_size} rank(s), global batch "
            f"{resolved.global_batch} = micro {resolved.micro_batch} x accum "
            f"{resolved.grad_accum} x dp {resolved.dims.dp}, vocab {resolved.vocab_size} "
            f"(padded {resolved.padded_vocab_size})"
        )
        return 0
    if args.command == "train":
        from scaletrain.launch.outcome import resumable_marker
        from scaletrain.logs import setup_logging
        from scaletrain.train.trainer import train

        setup_logging()

        config = load_config(args.config, args.overrides)
        with resumable_marker(config.train.run_dir):  # for launchers: torchrun hides exit 75
            train(config)
        return 0
    if args.command == "data":
        return _prepare(args)
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
    if args.command == "launch":
        from scaletrain.launch.commands import launch

        return launch(args)
    raise AssertionError(args)


def _prepare(args: argparse.Namespace) -> int:
    from scaletrain.data.prepare import prepare_dataset, stdlib_sources
    from scaletrain.logs import setup_logging

    setup_logging()
    inputs = list(args.input) + (stdlib_sources() if args.stdlib else [])
    if not inputs:
        raise ConfigError("--input", "no inputs; give files/folders or --stdlib")
    if args.tokenizer is None and args.vocab_size is None:
        raise ConfigError(
            "--vocab-size", "give --vocab-size N to train a tokenizer, or --tokenizer DIR"
        )
    info = prepare_dataset(
        inputs,
        args.output,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        num_proc=args.num_proc,
        text_field=args.text_field,
    )
    train, val = info.splits["train"], info.splits["val"]
    print(
        f"prepared {args.output}: train {train.num_tokens:,} tokens, val {val.num_tokens:,} "
        f"tokens, vocab {info.vocab_size} ({info.dtype})"
    )
    return 0


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
    from scaletrain.logs import setup_logging

    setup_logging()
    done = tools.consolidate(Path(args.path), Path(args.out), allow_pickle=args.allow_pickle)
    print(
        f"wrote {done.out}: {done.tensors} tensors, {done.parameters:,} parameters (fp32), "
        f"{done.bytes / 1e6:.1f} MB, step {done.step}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
