"""Read checkpoint files without running code from them.

A `.pt` file is a pickle, and unpickling one can call any function the file names. So every
checkpoint file scaletrain opens — in its own code and inside DeepSpeed (`engine.load_checkpoint`,
`ds_to_universal`, `zero_to_fp32`) — goes through torch's weights-only unpickler, which builds
only tensors, containers, numbers and the few types allow-listed here (the DeepSpeed objects its
ZeRO optimizer files hold). DeepSpeed asks for `weights_only=False`; torch's own
`TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`, set for the duration of `weights_only_loading()`, overrides
that, so no call site can forget it. This does not depend on where a checkpoint lives: a folder
someone else wrote is as safe to open as one this run wrote.

A file that holds anything more is refused in one line before any rank reads it
(`check_folder`), unless the user opted in (`checkpoint.allow_external_pickle=true` for training,
`--allow-pickle` for `ckpt consolidate`); only then does torch's full unpickler run.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from scaletrain.errors import ScaletrainError

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_NO_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # torch refuses both at once
TRAIN_OPT_IN = "set checkpoint.allow_external_pickle=true"
CLI_OPT_IN = "pass --allow-pickle"


class UnsafeCheckpoint(ScaletrainError):
    """A checkpoint file that only full unpickling (which can run code) would read."""


def deepspeed_types() -> list[Any]:
    """What DeepSpeed 0.19 pickles into ZeRO optimizer files besides tensors, found by scanning
    checkpoints of every kind scaletrain writes (ZeRO 0-3, fp32/bf16/fp16, pp2, MoE ep2,
    universal copies); scaletrain's own files need none. Each is a plain record: building one
    only sets its fields, whatever values the file holds."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address]


def allow_deepspeed_types() -> None:
    """Allow-list `deepspeed_types()` for weights-only loads in this process (idempotent)."""
    torch.serialization.add_safe_globals(deepspeed_types())


@contextlib.contextmanager
def weights_only_loading(allow_pickle: bool = False) -> Iterator[None]:
    """Every `torch.load` inside is weights-only, whatever its caller passes; with
    `allow_pickle` (the user's opt-in) the callers' own choice stands."""
    if allow_pickle:
        yield
        return
    allow_deepspeed_types()
    saved = {name: os.environ.pop(name, None) for name in (FORCE_ENV, FORCE_NO_ENV)}
    os.environ[FORCE_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(FORCE_ENV, None)
        os.environ.update({name: value for name, value in saved.items() if value is not None})


def load(path: Path, allow_pickle: bool = False, opt_in: str = TRAIN_OPT_IN, **kwargs: Any) -> Any:
    """`torch.load` of one checkpoint file, weights-only unless the user opted in."""
    if allow_pickle:
        return torch.load(path, map_location="cpu", weights_only=False, **kwargs)
    allow_deepspeed_types()
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        raise refusal(path, err, opt_in) from None


def refusal(path: Path, err: Exception, opt_in: str) -> UnsafeCheckpoint:
    """The one-line refusal, naming the global torch refused where it says which."""
    message = str(err)
    found = re.search(r"GLOBAL (\S+) was not an allowed global", message) or re.search(
        r"whose module (\S+) is blocked", message
    )
    if found:
        detail = f"global {found.group(1)}"
    else:
        tail = message.split("WeightsUnpickler error:")[-1].strip()
        detail = tail.splitlines()[0].strip() if tail else type(err).__name__
    return UnsafeCheckpoint(
        f"{path} holds objects that weights-only loading refuses ({detail}); unpickling them "
        f"can run code from the file: {opt_in} if you trust it"
    )


def unsafe_file(path: Path, opt_in: str = TRAIN_OPT_IN, unreadable: bool = True) -> str | None:
    """None if `path` loads weights-only, else its refusal line; a file that is no torch file
    at all is named too, unless `unreadable` is False (checksums have not been compared yet,
    and they say better what is wrong with it). Memory-maps the file: tensor bytes stay unread."""
    allow_deepspeed_types()
    try:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap can only be used" not in str(err):
                raise
            torch.load(path, map_location="cpu", weights_only=True)  # torch's legacy format
    except pickle.UnpicklingError as err:
        return str(refusal(path, err, opt_in))
    except (RuntimeError, EOFError, ValueError) as err:
        if not unreadable:
            return None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"{path} is not a file torch can read ({first})"
    return None


def pickle_files(folder: Path) -> list[Path]:
    """Every torch file of a checkpoint (or a universal copy), in a fixed order."""
    return sorted(p for p in folder.rglob("*.pt") if p.is_file())


def check_folder(
    folder: Path, opt_in: str = TRAIN_OPT_IN, collective: bool = False, unreadable: bool = True
) -> None:
    """Raise UnsafeCheckpoint for the first file of `folder` that weights-only loading refuses
    (see `unsafe_file` for `unreadable`).

    `collective`: every rank of the default group calls this; each checks its round-robin share
    and all raise the same error, so no rank goes on to load while another has stopped."""
    import torch.distributed as dist

    files = pickle_files(folder)
    shared = collective and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if shared else (0, 1)
    problems = [p for p in (unsafe_file(f, opt_in, unreadable) for f in files[rank::world]) if p]
    if shared:
        gathered: list[list[str]] = [[] for _ in range(world)]
        dist.all_gather_object(gathered, problems)
        problems = [p for part in gathered for p in part]
    if problems:
        raise UnsafeCheckpoint(sorted(problems)[0])
