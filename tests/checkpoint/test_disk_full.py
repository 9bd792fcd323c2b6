"""A save that runs out of disk space: one line on every rank, the staging folder removed, the
previous checkpoint still the newest and intact, and the run resumes from it once there is room.

The run directory is a real 3 MiB tmpfs (we are root, as launch/test.sh needs): the first
checkpoint (1.7 MB) fits, the second does not, so the failure is the kernel's ENOSPC inside
DeepSpeed's torch.save, not a simulation.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from scaletrain.checkpoint.manifest import Manifest, check_file
from tests.distributed import (
    printed_by_ranks,
    read_metrics,
    train_unchecked,
)

pytestmark = pytest.mark.slow


def disk_full_line(stderr: str, staging: Path, last_save_bytes: int) -> tuple[str, str]:
    """The one line a rank prints when the step-4 save after step 2 finds the disk full, and
    the free bytes it names (read back from `stderr`: they vary from run to run)."""
    free = (stderr.split(" bytes are free", 1)[0]).rsplit(" and ", 1)[1]
    line = (
        f"checkpoint: no space left on device in {staging}: the save needs "
        f"{last_save_bytes:,} bytes (the size of the last save) and {free} bytes are free; "
        "the staging folder was removed and step_00000002 is still the newest checkpoint; "
        "free space or set checkpoint.dir"
    )
    return line, free


@pytest.fixture
def small_fs(tmp_path: Path):
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)])
    assert done.returncode == 0, "mounting a small tmpfs needs root (as launch/test.sh has)"
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(
    stdlib_data: Path, small_fs: Path
) -> None:
    run = small_fs / "run"
    overrides = ("train.steps=4", "checkpoint.interval=2")
    done = train_unchecked(2, run, stdlib_data, *overrides)
    root = run / "checkpoints"
    step2 = Manifest.read(root / "step_00000002")
    assert step2 is not None
    staging = root / ".staging" / "step_00000004"
    line, free = disk_full_line(done.stderr, staging, step2.total_bytes)
    assert done.returncode == 1  # torchrun's code; the ranks exit 1 ("other": a crash)
    assert printed_by_ranks(done.stderr, line) == 2, done.stderr[-3000:]  # both ranks
    assert int(free.replace(",", "")) < step2.total_bytes
    warnings = [ln.split(" WARNING ", 1)[1] for ln in done.stderr.splitlines() if " WARNING " in ln]
    assert warnings == [
        f"checkpoint: {free} bytes free in {root}, the last save took {step2.total_bytes:,} "
        "bytes: this save will probably fail; free space or set checkpoint.dir"
    ]
    assert not staging.exists()
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002"]
    assert [check_file(step2.folder, entry) for entry in step2.files] == [None] * len(step2.files)
    logged = read_metrics(run)
    assert [m["step"] for m in logged] == [1, 2, 3, 4]  # step 4 ran; its save failed

    subprocess.run(["mount", "-o", "remount,size=8m", str(small_fs)], check=True)
    done = train_unchecked(2, run, stdlib_data, *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = read_metrics(run)
    assert [(m["step"], m["loss"]) for m in resumed] == [(m["step"], m["loss"]) for m in logged]
    assert (root / "latest").read_text().strip() == "step_00000004"
