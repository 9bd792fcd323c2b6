"""Async checkpoint saves: the loop waits only while the state is copied into host memory the
writer owns; a background thread writes, fsyncs, checksums and publishes it.

The snapshot goes through DeepSpeed's own extension point: during `engine.save_checkpoint` the
engine's checkpoint engine is swapped for `CapturingEngine`, whose `save(state_dict, path)`
keeps a copy of the state dict instead of writing it. The copy keeps the state dict's exact
structure (containers, storage sharing, views, `requires_grad`, parameters, the device a storage
came from), so the writer's `torch.save` through DeepSpeed's engine writes the same bytes as a
synchronous save. DeepSpeed 0.19's own `DecoupledCheckpointEngine` does not serve here: it
takes no snapshot (the next optimizer step waits for the write), never commits under a pipeline
engine, needs the DeepSpeed launcher's CROSS_SIZE/CROSS_RANK, and on CPU ZeRO-1 it fails with
"Cowardly refusing to serialize non-leaf tensor which requires_grad" (docs/checkpoints.md).

The writer's collectives (agreeing on failures, sharing the checksums, the closing barrier) run
on a gloo group of its own, never on the group the training loop uses at the same time.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import (
    CheckpointCommitInfo,
    CheckpointEngine,
)

from scaletrain.logs import get_logger

log = get_logger(__name__)

Saver = Callable[[Any, str], Any]
"""How a file is written: DeepSpeed's engine.save for its files, torch.save for ours."""

# Test-only: "STEP:SECONDS" makes the writer sleep SECONDS after writing the files of the save
# at STEP, before it checksums and publishes them (a write that is still in flight).
SLOW_WRITE_ENV = "SCALETRAIN_TEST_SLOW_ASYNC_SAVE"

_ORIGINS: dict[int, str] = {}
"""data_ptr of a host copy -> where its storage lived ("cuda:0"): what torch.save records."""


def _tag_origin(storage: Any) -> str | None:
    """torch.save's location tagger for snapshot storages (None: not ours, ask the next)."""
    return _ORIGINS.get(storage.data_ptr()) if storage.device.type == "cpu" else None


def _restore_none(obj: Any, location: str) -> None:
    return None  # loading is left to torch's own deserializers


torch.serialization.register_package(5, _tag_origin, _restore_none)  # before "cpu" (10)


class HostBuffers:
    """Host memory kept from one save to the next: fresh pages cost ~4x a copy into used
    ones (page faults; pinning on GPU hosts), and every save of a run has the same sizes."""

    def __init__(self) -> None:
        self._free: dict[tuple[int, bool], list[torch.Tensor]] = {}

    def take(self, nbytes: int, pinned: bool) -> torch.Tensor:
        free = self._free.get((nbytes, pinned))
        if free:
            return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)

    def give(self, buffer: torch.Tensor) -> None:
        self._free.setdefault((buffer.numel(), buffer.is_pinned()), []).append(buffer)


class Snapshot:
    """Host copies of state dicts, made on the caller's thread; `release()` hands the
    memory back to its `HostBuffers`."""

    def __init__(self, buffers: HostBuffers | None = None) -> None:
        self.items: list[tuple[str, Any, Saver]] = []
        self.buffers = buffers or HostBuffers()
        self._storages: dict[int, torch.Tensor] = {}  # StorageImpl -> its host copy
        self._memo: dict[int, Any] = {}
        self._device_copies = False

    def add(self, path: str, state: Any, save: Saver = torch.save) -> None:
        """Copy `state` (tensors into owned host memory, containers rebuilt); the writer
        calls `save(copy, path)`."""
        self._find_tensors(state, set())
        self.items.append((path, copy.deepcopy(state, self._memo), save))

    def write(self) -> None:
        for path, state, save in self.items:
            save(state, path)

    def finish(self) -> None:
        """Wait for device-to-host copies: after this the device state may change."""
        if self._device_copies and torch.cuda.is_available():
            torch.cuda.synchronize()

    def release(self) -> None:
        self.items.clear()
        self._memo.clear()
        for buffer in self._storages.values():
            _ORIGINS.pop(buffer.data_ptr(), None)
            self.buffers.give(buffer)
        self._storages.clear()

    def _find_tensors(self, obj: Any, seen: set[int]) -> None:
        """Pre-copy every tensor reachable through containers and object attributes, so
        that deepcopy takes the copies (sharing kept) instead of cloning on the device."""
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None))):
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if id(obj) not in self._memo and (copied := self._copy_tensor(obj)) is not None:
                self._memo[id(obj)] = copied
                self._memo.setdefault(id(self._memo), []).append(obj)  # keep the key alive
            return
        if isinstance(obj, dict):
            children: Any = obj.values()
        elif isinstance(obj, (list, tuple, set, frozenset)):
            children = obj
        else:
            children = getattr(obj, "__dict__", {}).values()
        for child in children:
            self._find_tensors(child, seen)

    def _copy_tensor(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """A host tensor over a copy of `tensor`'s whole storage (what torch.save writes);
        None for kinds deepcopy handles itself (sparse, quantized, subclasses, meta)."""
        plain = type(tensor) in (torch.Tensor, torch.nn.Parameter)
        if not plain or tensor.layout != torch.strided or tensor.is_quantized:
            return None
        if tensor.device.type == "meta":
            return None
        storage = tensor.untyped_storage()
        host = self._storages.get(storage._cdata)
        if host is None:
            pinned = tensor.device.type == "cuda"
            host = self.buffers.take(storage.nbytes(), pinned)
            source = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
            host.copy_(source, non_blocking=pinned)
            self._device_copies |= pinned
            if tensor.device.type != "cpu":
                _ORIGINS[host.data_ptr()] = torch.serialization.location_tag(storage)
            self._storages[storage._cdata] = host
        view = torch.empty(0, dtype=tensor.dtype).set_(
            host.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride()
        )
        if isinstance(tensor, torch.nn.Parameter):
            view = torch.nn.Parameter(view, requires_grad=tensor.requires_grad)
        elif tensor.requires_grad:
            view.requires_grad_(True)
        if tensor.__dict__:  # megatron-core's tensor_model_parallel and friends
            view.__dict__.update(copy.deepcopy(tensor.__dict__, self._memo))
        return view


class CapturingEngine(CheckpointEngine):
    """DeepSpeed's checkpoint engine, with `save` deferred: it snapshots the state dict."""

    def __init__(self, inner: CheckpointEngine, snapshot: Snapshot) -> None:
        super().__init__()
        self.inner, self.snapshot = inner, snapshot
        self.name = f"Capturing({inner.name})"

    def create(self, info: CheckpointCommitInfo) -> None:
        self.inner.create(info)

    def save(self, state_dict: Any, path: str) -> None:
        self.snapshot.add(path, state_dict, self.inner.save)  # the writer calls it

    def load(self, path: str, map_location: Any = None) -> Any:
        return self.inner.load(path, map_location)

    def commit(self, info: CheckpointCommitInfo) -> bool:
        return self.inner.commit(info)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.inner.makedirs(path, exist_ok=exist_ok)

    def preserves_storage_sharing(self) -> bool:
        return self.inner.preserves_storage_sharing()


class AsyncWriter:
    """At most one background save at a time; its error comes out of the next `wait()`."""

    def __init__(self, timeout_minutes: float) -> None:
        self.timeout = timedelta(minutes=timeout_minutes)
        self.group: dist.ProcessGroup | None = None
        self.history: list[float] = []
        """Seconds each background save took, from its start to published."""
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._buffers = HostBuffers()

    @contextlib.contextmanager
    def capture(self, engine: Any) -> Iterator[Snapshot]:
        """Collective (the first time: the writer's group is made): while inside, the
        engine's `save_checkpoint` snapshots instead of writing."""
        if self.group is None:
            self.group = dist.new_group(backend="gloo", timeout=self.timeout)
        snapshot = Snapshot(self._buffers)
        inner = engine.checkpoint_engine
        engine.checkpoint_engine = CapturingEngine(inner, snapshot)
        try:
            yield snapshot
            snapshot.finish()
        except BaseException:
            snapshot.release()
            raise
        finally:
            engine.checkpoint_engine = inner

    def start(
        self,
        snapshot: Snapshot,
        step: int,
        publish: Callable[[BaseException | None], None],
        started: float,
    ) -> None:
        """Write `snapshot` in the background, then `publish(failure)` (collective in
        `self.group`: every rank's writer takes part). `started`: when the save began."""
        assert self._thread is None, "wait() for the previous save first"

        def run() -> None:
            failure: BaseException | None = None
            try:
                snapshot.write()
                _slow_down(step)
            except Exception as err:  # the others must hear of it: publish agrees on it
                failure = err
            finally:
                snapshot.release()
            try:
                publish(failure)
            except BaseException as err:
                self._error = err
            self.history.append(time.perf_counter() - started)

        self._thread = threading.Thread(target=run, name=f"checkpoint-writer-{step}", daemon=True)
        self._thread.start()

    @property
    def last_write_seconds(self) -> float:
        return self.history[-1] if self.history else 0.0

    def wait(self) -> None:
        """Block until the save in flight is published; raise its error (the same on every
        rank: the writers agreed on it)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error


def _slow_down(step: int) -> None:
    value = os.environ.get(SLOW_WRITE_ENV)
    if value:
        at, seconds = value.split(":")
        if int(at) == step:
            time.sleep(float(seconds))
