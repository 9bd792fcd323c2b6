"""The cluster file: where and how a run's SLURM job is placed, kept apart from the run config.

A run config says *what* to train; a cluster file (`configs/clusters/*.yaml`) says which
partition, how many GPUs a node has, how the software is set up on the compute nodes and
which network variables NCCL needs. `scaletrain launch slurm` joins the two into one sbatch
script. Fields are overridden on the command line as `cluster.field=value`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from scaletrain.config.load import _build, _read_yaml
from scaletrain.errors import ConfigError
from scaletrain.plan.hardware import hardware_names
from scaletrain.resources import CLUSTERS_DIR

OVERRIDE_PREFIX = "cluster."
VERBATIM = ("time", "mem")  # SLURM's own syntax: kept as written on the command line


@dataclass
class ClusterConfig:
    """One SLURM cluster (or partition): the job's resources, software setup and network."""

    partition: str | None = None
    """`--partition`; null = the cluster's default partition."""
    account: str | None = None
    """`--account` to charge; null = your default account."""
    qos: str | None = None
    """`--qos`; null = the partition's default."""
    nodes: int = 1
    """Nodes per job when `--nodes` is not given. nodes x gpus_per_node must equal the run's
    world size (tp x pp x dp)."""
    gpus_per_node: int = 8
    """GPUs requested per node (`--gpus-per-node`) and ranks started per node by torchrun. On
    the one-machine test cluster these are CPU ranks on fake GPUs."""
    gpu: str | None = None
    """The nodes' GPU: an entry of configs/hardware.yaml (e.g. "H100-SXM"). `launch slurm`
    plans the job for it (per-rank memory, tokens/s, ETA) and refuses a layout that does not
    fit; null = no plan check."""
    cpus_per_task: int | None = None
    """`--cpus-per-task` for the one task per node (it runs torchrun and all its ranks);
    passed to srun too, which does not inherit it since SLURM 22.05."""
    mem: str | None = None
    """`--mem` per node, e.g. "480G"; "0" = all of the node's memory; null = the default."""
    time: str = "04:00:00"
    """Wall-clock limit per job, `--time` ("HH:MM:SS", "D-HH:MM:SS" or "MM"). Quote it in
    YAML: unquoted 04:00:00 is read as a number."""
    signal_lead_seconds: int = 300
    """USR1 reaches the batch script this long before the time limit (`--signal=B:USR1@N`);
    training must save within it. SLURM checks every 30 s, so it may arrive up to 30 s early.
    Also the time torchrun gives its ranks to finish the save before it kills them."""
    requeue: bool = True
    """After a stop on purpose (exit 75) the job requeues itself (`--requeue` plus
    `scontrol requeue`) and resumes from the newest checkpoint. `--chain K` turns it off."""
    constraint: str | None = None
    """`--constraint` node features, e.g. "h100&ib"."""
    exclusive: bool = True
    """`--exclusive`: no other job shares the nodes."""
    sbatch_args: list[str] = field(default_factory=list)
    """More `#SBATCH` options as written on the sbatch command line, e.g. "--reservation=x"."""
    srun_args: list[str] = field(default_factory=list)
    """More srun options, e.g. "--cpu-bind=none" or "--mpi=pmix"."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before training in the batch script: `module load ...`,
    `source /path/venv/bin/activate`, ... The job starts in the folder you submitted from."""
    env: dict[str, str] = field(default_factory=dict)
    """Variables exported for training: NCCL and network settings (NCCL_SOCKET_IFNAME,
    NCCL_IB_HCA, ...), OMP_NUM_THREADS, DS_ACCELERATOR."""
    container_image: str | None = None
    """pyxis/enroot: run every rank in this image (`srun --container-image`); null = no
    container."""
    container_mounts: list[str] = field(default_factory=list)
    """pyxis `--container-mounts` entries "src:dst"; the run, data and code folders must be
    visible at the same paths inside the container."""
    container_workdir: str | None = None
    """pyxis `--container-workdir`; null = the folder the job was submitted from."""
    output_dir: str | None = None
    """Folder of the job's stdout/stderr files; null = `<train.run_dir>/slurm`."""


def cluster_path(name: str) -> Path:
    """A path as given, or a name in configs/clusters/ (`local` -> configs/clusters/local.yaml)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return CLUSTERS_DIR / f"{name}.yaml"


def load_cluster(name: str, overrides: list[str] | None = None) -> ClusterConfig:
    """Read a cluster file, apply `cluster.field=value` overrides, type-check the result."""
    raw = _read_yaml(cluster_path(name), "--cluster", "fields")
    for override in overrides or []:
        key, sep, text = override.partition("=")
        if not sep or not key.startswith(OVERRIDE_PREFIX):
            raise ConfigError(key or override, "cluster overrides are written cluster.field=value")
        name = key.removeprefix(OVERRIDE_PREFIX)
        if name in VERBATIM:  # cluster.time=4:00:00 means 4 hours, not YAML's 14400
            raw[name] = text
            continue
        try:
            raw[name] = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            raise ConfigError(key, f"value {text!r} is not valid YAML; quote it") from None
    env = raw.pop("env", None) or {}
    if not isinstance(env, dict) or not all(
        isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in env.values()
    ):
        raise ConfigError("cluster.env", "must map variable names to strings or numbers")
    for key in ("time", "mem"):  # YAML 1.1 reads 04:00:00 as 14400 and 480 as an int
        if isinstance(raw.get(key), int) and not isinstance(raw[key], bool):
            raise ConfigError(f"cluster.{key}", f"write it as a quoted string, e.g. {key}: '...'")
    cluster = _build(ClusterConfig, raw, "cluster")
    cluster.env = {str(k): str(v) for k, v in env.items()}
    _check(cluster)
    return cluster


def _check(cluster: ClusterConfig) -> None:
    for name in ("nodes", "gpus_per_node"):
        if getattr(cluster, name) < 1:
            raise ConfigError(f"cluster.{name}", f"must be >= 1, got {getattr(cluster, name)}")
    if cluster.cpus_per_task is not None and cluster.cpus_per_task < 1:
        raise ConfigError("cluster.cpus_per_task", f"must be >= 1, got {cluster.cpus_per_task}")
    if cluster.signal_lead_seconds < 1:
        raise ConfigError(
            "cluster.signal_lead_seconds",
            f"must be >= 1 (seconds before the time limit), got {cluster.signal_lead_seconds}",
        )
    if cluster.gpu is not None:
        known = hardware_names()
        if cluster.gpu not in known:
            raise ConfigError(
                "cluster.gpu",
                f"{cluster.gpu!r} is not in configs/hardware.yaml; known: {', '.join(known)}",
            )
    if not cluster.time.strip():
        raise ConfigError("cluster.time", "is empty; give a limit such as '04:00:00'")
    bad = [k for k in cluster.env if not k.isidentifier()]
    if bad:
        raise ConfigError(f"cluster.env.{bad[0]}", "is not a valid shell variable name")


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(run config overrides, cluster overrides) from one list of trailing words."""
    cluster = [o for o in overrides if o.startswith(OVERRIDE_PREFIX)]
    return [o for o in overrides if not o.startswith(OVERRIDE_PREFIX)], cluster
