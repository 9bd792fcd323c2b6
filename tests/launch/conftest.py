"""The one-machine SLURM for the launcher tests: started (if not yet running) by the same
script users run, `slurm/local-cluster.sh start`; its SLURM_CONF is exported to the tests and
through them to sbatch/scontrol and the jobs."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.distributed import REPO

CLUSTER_SCRIPT = REPO / "slurm" / "local-cluster.sh"


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """SLURM_CONF of the running local cluster (installs and starts it when needed)."""
    done = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"local cluster did not start:\n{done.stdout}{done.stderr}"
    env = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "env"], capture_output=True, text=True, check=True
    )
    conf = env.stdout.strip().removeprefix("export SLURM_CONF=")
    os.environ["SLURM_CONF"] = conf
    return conf
