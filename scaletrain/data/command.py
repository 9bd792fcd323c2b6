"""`scaletrain data prepare`: its arguments and its run; cli.py only registers them.

Ctrl-C ends it with exit 130 and one line: the output folder never holds a half-written data
set (see `shards.py`), so the user only needs to know that running the command again is safe.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from types import FrameType

from scaletrain.errors import ConfigError

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C


def add_parser(data_cmds: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `data prepare` and its flags."""
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
    prepare.add_argument(
        "--format",
        dest="fmt",
        choices=["text", "chat", "prompt-response", "classify"],
        default="text",
        help="text: pretraining; chat (messages lists) or prompt-response: SFT jsonl with a "
        "loss mask on the responses; classify: csv/jsonl/parquet rows of --text-field and "
        "--label-field (these need --tokenizer)",
    )
    prepare.add_argument("--label-field", default="label", help="label column (classify)")
    prepare.add_argument(
        "--max-length",
        type=int,
        default=128,
        help="classify: tokens per example, longer texts are cut, shorter ones padded",
    )
    prepare.add_argument("--seed", type=int, default=1234)
    prepare.add_argument(
        "--encoding", default="utf-8", help="codec of the text files, e.g. latin-1 (utf-8)"
    )
    prepare.add_argument(
        "--glob",
        dest="globs",
        nargs="+",
        action="extend",
        default=[],
        metavar="PATTERN",
        help="also read files in folders whose name matches, as text: '*.rst', '*' for all",
    )


def run(args: argparse.Namespace) -> int:
    """Prepare the data set; print one summary line (or one line and exit 130 on Ctrl-C)."""
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
    interrupt = _Interrupt()
    try:
        with interrupt.in_main_process_only():
            info = prepare_dataset(
                inputs,
                args.output,
                tokenizer=args.tokenizer,
                vocab_size=args.vocab_size,
                val_fraction=args.val_fraction,
                seed=args.seed,
                num_proc=args.num_proc,
                text_field=args.text_field,
                encoding=args.encoding,
                globs=args.globs,
                fmt=args.fmt,
                label_field=args.label_field,
                max_length=args.max_length,
            )
    except BaseException:
        # `datasets` turns an interrupted parallel map into a TimeoutError while unwinding,
        # so what was raised is no guide: the flag says whether Ctrl-C started it.
        if not interrupt.seen:
            raise
        print(
            f"interrupted: {args.output} holds no half-written data set; run the same command "
            "again to prepare it",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    train, val = info.splits["train"], info.splits["val"]
    print(
        f"prepared {args.output}: train {train.num_tokens:,} tokens, val {val.num_tokens:,} "
        f"tokens, vocab {info.vocab_size} ({info.dtype})"
    )
    return 0


class _Interrupt:
    """Ctrl-C interrupts this process once; forked tokenizing workers ignore it.

    A terminal's Ctrl-C reaches every process of the group: without this each `datasets` map
    worker printed its own KeyboardInterrupt traceback. The main process stops the pool when
    the interrupt unwinds it, and further Ctrl-Cs cannot break the clean-up of the work folder.
    """

    def __init__(self) -> None:
        self.seen = False
        self._main_pid = os.getpid()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._main_pid:
            return
        self.seen = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def in_main_process_only(self) -> Iterator[None]:
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
