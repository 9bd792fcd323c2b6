"""One rank-aware logger: rank 0 speaks, other ranks only warn."""

from __future__ import annotations

import logging
import os
import sys

from rich.console import Console
from rich.logging import RichHandler

_CONFIGURED = False


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = f"[rank {self.rank}] {record.msg}" if self.rank else record.msg
        return self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(level: int = logging.INFO) -> None:
    """Route `scaletrain.*` loggers through rich; quiet DeepSpeed's per-step chatter."""
    global _CONFIGURED
    if _CONFIGURED:
        return
    handler: logging.Handler
    if sys.stderr.isatty():
        handler = RichHandler(
            console=Console(stderr=True),  # stdout stays for results and the progress lines
            show_path=False,
            markup=False,
            rich_tracebacks=False,
        )
    else:  # log files (SLURM, CI): one unwrapped line per record, easy to grep
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.addFilter(_RankFilter(int(os.environ.get("RANK", 0))))
    root = logging.getLogger("scaletrain")
    root.setLevel(level)
    root.addHandler(handler)
    root.propagate = False
    for noisy in ("DeepSpeed", "deepspeed", "megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _CONFIGURED = True


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("scaletrain") else f"scaletrain.{name}")
