"""An installed (non-editable) scaletrain finds its configs and SLURM template: the wheel
carries them as package data, and the code reads them from the package, not the clone."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.distributed import REPO

SHIPPED = [*sorted((REPO / "configs").rglob("*.yaml")), REPO / "slurm" / "job.sbatch.in"]


def _source_copy(to: Path) -> Path:
    """The clone's files (links kept as links): the build writes build/ and egg-info there."""
    listed = ["git", "ls-files", "-co", "--exclude-standard", "-z"]
    names = subprocess.run(listed, cwd=REPO, check=True, capture_output=True).stdout
    for name in filter(None, names.decode().split("\0")):
        source, target = REPO / name, to / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(source.readlink())
        elif source.is_file():
            shutil.copy2(source, target)
    return to


def test_the_wheel_carries_every_config_and_the_job_template(tmp_path: Path) -> None:
    source = _source_copy(tmp_path / "source")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*build, "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("scaletrain-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        for path in SHIPPED:
            inside = path.relative_to(REPO / "configs") if path.suffix == ".yaml" else None
            name = f"scaletrain/configs/{inside}" if inside else "scaletrain/job.sbatch.in"
            assert archive.read(name) == path.read_bytes(), name
        archive.extractall(tmp_path / "site")
    # The unpacked wheel alone, run outside the clone: the planner's device table, a cluster
    # file, a model preset and the job template are all found.
    probe = (
        "from scaletrain.plan.hardware import load_hardware;"
        "from scaletrain.launch.cluster import CLUSTERS_DIR;"
        "from scaletrain.config.load import MODELS_DIR;"
        "from scaletrain.launch.slurm import TEMPLATE;"
        "import scaletrain;"
        "print(scaletrain.__file__, load_hardware('H200').memory_bytes,"
        " (CLUSTERS_DIR / 'local.yaml').is_file(), (MODELS_DIR / 'tiny.yaml').is_file(),"
        " TEMPLATE.is_file())"
    )
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    where, memory, *found = done.stdout.split()
    assert where.startswith(str(tmp_path / "site"))
    assert (float(memory), found) == (141e9, ["True", "True", "True"])
