"""One owner per run directory: an exclusive lock held by global rank 0 for the run's life.

Two mechanisms, because shared file systems differ:

- `flock` on `<run_dir>/lock`. The kernel drops it when the holder dies, so a `kill -9`'d run
  never blocks its own restart. On a local disk and on NFS (Linux emulates flock with NFS byte
  range locks) a second run cannot take it. It may be a no-op (NFS mounted `nolock` or
  `local_lock=all`, Lustre mounted `localflock`: it locks only this node) or fail (Lustre
  without the `flock` mount option: ENOSYS), so:
- a holder record `<run_dir>/owner.json` (host, pid and its start time, since when, the SLURM
  job id and restart count), refreshed every `REFRESH_SECONDS`. A starting run refuses a record
  from a live holder even when its flock succeeded: the same host with that process alive, or
  another host with a record fresher than `STALE_SECONDS`. The same SLURM job with a higher
  restart count is a requeue (take over); a stale record, or a dead process on this host, is
  taken over with a warning.

A refused run writes nothing: it only opens the lock file and reads the record.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from scaletrain.config.schema import Config
from scaletrain.errors import ScaletrainError
from scaletrain.logs import get_logger

log = get_logger(__name__)

LOCK_FILE = "lock"
OWNER_FILE = "owner.json"
REFRESH_SECONDS = 30.0
STALE_SECONDS = 120.0  # four missed refreshes: its writer is gone (or its clock is far off)
_NO_FLOCK = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)


@dataclass(frozen=True)
class Holder:
    """Who owns a run directory, as `owner.json` says."""

    host: str
    pid: int
    pid_started: float
    """The process's start time (psutil), so a reused pid is not taken for the holder."""
    since: float
    updated: float
    slurm_job_id: str | None = None
    slurm_restart: int = 0
    """SLURM_RESTART_COUNT: a requeued job runs again with the same id and a higher count."""

    @classmethod
    def me(cls, since: float | None = None) -> Holder:
        now = time.time()
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_started=psutil.Process().create_time(),
            since=since or now,
            updated=now,
            slurm_job_id=os.environ.get("SLURM_JOB_ID") or None,
            slurm_restart=int(os.environ.get("SLURM_RESTART_COUNT") or 0),
        )

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        job = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"host {self.host}, pid {self.pid}{job}, since {since}"

    def alive_here(self) -> bool:
        """This host's process with that pid and start time exists."""
        try:
            return abs(psutil.Process(self.pid).create_time() - self.pid_started) < 1.0
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False


def read_holder(run_dir: Path) -> Holder | None:
    """The holder record, or None if there is none or it cannot be parsed."""
    try:
        data = json.loads((run_dir / OWNER_FILE).read_text())
        return Holder(**data)
    except (OSError, ValueError, TypeError):
        return None


def verdict(record: Holder | None, me: Holder, now: float) -> tuple[bool, str | None]:
    """(may take the directory, warning to log) for a run whose flock succeeded."""
    if record is None or (record.host, record.pid) == (me.host, me.pid):
        return True, None
    same_job = me.slurm_job_id is not None and record.slurm_job_id == me.slurm_job_id
    if same_job and record.slurm_restart < me.slurm_restart:
        return True, None  # a requeue of the same job: SLURM ended its earlier run
    if record.host == me.host:
        if record.alive_here():
            return False, None
        return True, f"the previous holder ({record.describe()}) is gone; taking over"
    if now - record.updated < STALE_SECONDS:
        return False, None
    age = now - record.updated
    return True, f"the holder record ({record.describe()}) is {age:.0f}s old; taking over"


def refusal(run_dir: Path, holder: Holder | None, field: str = "train.run_dir") -> str:
    who = holder.describe() if holder else "a process that has not written owner.json yet"
    return (
        f"{field}: {run_dir} is in use by another run ({who}); stop that run first, or "
        f"use another {field}"
    )


class RunLock:
    """Rank 0's ownership of a run directory: `acquire()` ... `release()`."""

    def __init__(self, run_dir: str | Path, field: str = "train.run_dir") -> None:
        self.run_dir = Path(run_dir)
        self.field = field  # the config field that named the folder, for the refusal
        self._fd: int | None = None
        self._me: Holder | None = None
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the directory or raise ScaletrainError naming its holder (writes nothing then)."""
        me = Holder.me()
        record = read_holder(self.run_dir)
        if not verdict(record, me, time.time())[0]:  # before creating anything
            raise ScaletrainError(refusal(self.run_dir, record, self.field))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        if not _flock(fd, self.run_dir):
            os.close(fd)
            raise ScaletrainError(refusal(self.run_dir, read_holder(self.run_dir), self.field))
        record = read_holder(self.run_dir)  # again: it may have been written meanwhile
        allowed, warning = verdict(record, me, time.time())
        if not allowed:
            os.close(fd)  # the flock was a no-op here, or the holder is on another node
            raise ScaletrainError(refusal(self.run_dir, record, self.field))
        if warning:
            log.warning("%s %s: %s", self.field, self.run_dir, warning)
        self._fd, self._me = fd, me
        self._write(me)
        self._refresher = threading.Thread(target=self._refresh, name="run-lock", daemon=True)
        self._refresher.start()

    def _write(self, holder: Holder) -> None:
        tmp = self.run_dir / f".{OWNER_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(asdict(holder)) + "\n")
        os.replace(tmp, self.run_dir / OWNER_FILE)

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            assert self._me is not None
            with contextlib.suppress(OSError):  # a full or flaky disk must not kill the run
                self._write(Holder.me(since=self._me.since))

    def release(self) -> None:
        """Give the directory up (idempotent); the kernel does the same if the process dies."""
        if self._fd is None:
            return
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()
        record = read_holder(self.run_dir)
        if (
            record is not None
            and self._me
            and (record.host, record.pid)
            == (
                self._me.host,
                self._me.pid,
            )
        ):
            (self.run_dir / OWNER_FILE).unlink(missing_ok=True)
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def own_run_dir(folders: dict[str, Path], rank: int, world_size: int) -> list[RunLock]:
    """Collective: global rank 0 locks every folder the run writes (config field -> folder:
    the run directory, and a `checkpoint.dir` outside it), every rank learns the outcome
    before any of them writes; a refused run raises the same one line on every rank (exit 2)
    and holds none of the locks."""
    locks: list[RunLock] = []
    problem = None
    for field, folder in folders.items() if rank == 0 else ():
        lock = RunLock(folder, field)
        try:
            lock.acquire()
        except ScaletrainError as err:
            problem = str(err)
        except OSError as err:  # the others must not wait for a rank 0 that gave up
            problem = f"{field}: cannot lock {folder} ({err}); choose a writable folder"
        if problem:
            for taken in locks:
                taken.release()
            locks = []
            break
        locks.append(lock)
    if world_size > 1:
        import torch.distributed as dist

        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise ScaletrainError(problem)
    return locks


def locked_folders(config: Config) -> dict[str, Path]:
    """What a run owns: its run directory, and its checkpoint folder when that lies outside."""
    run_dir = Path(config.train.run_dir)
    folders = {"train.run_dir": run_dir}
    ckpt = config.checkpoint.dir
    if ckpt and not Path(ckpt).resolve().is_relative_to(run_dir.resolve()):
        folders["checkpoint.dir"] = Path(ckpt)
    return folders


def _flock(fd: int, run_dir: Path) -> bool:
    """False if another open file holds the lock; True if taken or flock is unsupported."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno not in _NO_FLOCK:
            raise
        log.info("flock is not supported on %s (%s): the holder record decides", run_dir, err)
    return True


def probe_holder(run_dir: Path, field: str = "train.run_dir") -> str | None:
    """For launchers, before any rank starts: the refusal a run would get now, or None.
    Only reads (a lock file that does not exist yet is not created)."""
    lock = run_dir / LOCK_FILE
    if not lock.is_file():
        return None
    fd = os.open(lock, os.O_RDONLY)
    try:
        if not _flock(fd, run_dir):
            return refusal(run_dir, read_holder(run_dir), field)
        record = read_holder(run_dir)
        allowed, _ = verdict(record, Holder.me(), time.time())
        return None if allowed else refusal(run_dir, record, field)
    finally:
        os.close(fd)  # drops the probe's flock
