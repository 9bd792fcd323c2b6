"""`scaletrain export hf CHECKPOINT_OR_RUN_DIR OUT_DIR`: its parser and its run."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser("export", help="write a checkpoint in another format")
    formats = export.add_subparsers(dest="format", required=True)
    hf = formats.add_parser(
        "hf", help="a Hugging Face folder (LlamaForCausalLM / MixtralForCausalLM + tokenizer)"
    )
    hf.add_argument("source", metavar="CHECKPOINT_OR_RUN_DIR", type=Path)
    hf.add_argument("out", metavar="OUT_DIR", type=Path)
    hf.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32", help="weights dtype")
    hf.add_argument(
        "--tokenizer", type=Path, help="tokenizer folder (default: the run's data set's)"
    )
    hf.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    lora = hf.add_mutually_exclusive_group()
    lora.add_argument(
        "--merge-lora",
        dest="lora",
        action="store_const",
        const="merge",
        help="a LoRA checkpoint: write its base with the adapters merged in",
    )
    lora.add_argument(
        "--lora-adapter",
        dest="lora",
        action="store_const",
        const="adapter",
        help="a LoRA checkpoint: write a peft adapter folder for its base",
    )


def run(args: argparse.Namespace) -> int:
    from scaletrain.hf.export import export_hf

    done = export_hf(args.source, args.out, args.dtype, args.tokenizer, args.force, args.lora)
    print(
        f"exported {done.checkpoint} as {done.architecture} ({done.parameters:,} parameters, "
        f"{args.dtype}) to {done.out}"
    )
    return 0
