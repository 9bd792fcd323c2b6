"""`scaletrain launch slurm`: a run config plus a cluster file become one sbatch script.

The script is rendered from `slurm/job.sbatch.in` into `<run_dir>/slurm/` next to the resolved
run config it trains, so a requeued job (or the next job of a chain) trains exactly the same
config and resumes from the newest checkpoint. Nothing is written before the layout has been
checked against nodes x GPUs per node.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from scaletrain.config import check_config, dump_yaml
from scaletrain.config.checks import Resolved
from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError, ScaletrainError
from scaletrain.launch.cluster import ClusterConfig
from scaletrain.resources import SBATCH_TEMPLATE as TEMPLATE

SLURM_DIR = "slurm"  # inside the run folder: script, resolved config, job records, logs
SCRIPT, CONFIG, JOBS = "job.sbatch", "config.yaml", "jobs.jsonl"
_PLACEHOLDER = re.compile(r"\{\{ (\w+) \}\}")


@dataclass(frozen=True)
class SlurmJob:
    """A rendered job: where its files go and what they hold."""

    run_dir: Path
    script: Path
    config: Path
    log_dir: Path
    job_name: str
    script_text: str
    config_text: str
    chain: int

    def log_files(self, job_id: str) -> tuple[Path, Path]:
        """(stdout, stderr) of one job, as `--output`/`--error` name them."""
        stem = self.log_dir / f"{self.job_name}-{job_id}"
        return stem.with_suffix(".out"), stem.with_suffix(".err")


def check_layout(config: Config, nodes: int, gpus_per_node: int) -> Resolved:
    """nodes x gpus_per_node must be the world size of the layout (tp x pp x dp)."""
    if nodes < 1:  # before the world size: 0 or -3 nodes is a bad flag, not a bad layout
        raise ConfigError("--nodes", f"must be >= 1, got {nodes}")
    world = nodes * gpus_per_node
    p = config.parallel
    per_replica = p.tp * p.pp
    need = per_replica * p.dp if p.dp is not None else None
    if (need is not None and need != world) or world % per_replica:
        fix = (
            f"use --nodes {need // gpus_per_node}"
            if need is not None and need % gpus_per_node == 0
            else "change --nodes, cluster.gpus_per_node or the layout"
        )
        layout = (
            f"tp ({p.tp}) x pp ({p.pp}) x dp ({p.dp}) = {need}"
            if need is not None
            else f"tp ({p.tp}) x pp ({p.pp}) = {per_replica} does not divide it"
        )
        raise ConfigError(
            "--nodes",
            f"{nodes} node(s) x {gpus_per_node} GPUs per node = {world} ranks, but {layout}; {fix}",
        )
    # The data may live only on the cluster's file system: then its vocabulary is read there.
    # The ranks run on the cluster's nodes, so this machine's CPU says nothing about fp16.
    data_here = all(Path(path).exists() for path in config.data.paths)
    return check_config(config, world, check_data=data_here, ranks_here=False)


def plan_check(config: Config, cluster: ClusterConfig, nodes: int) -> str:
    """The plan's one-line summary of the job on `cluster.gpu`; a ScaletrainError (exit 2)
    naming the stage, the excess and the best fitting layout of `plan --search` when the
    largest stage does not fit in the device's memory. Builds nothing, starts nothing."""
    from scaletrain.plan.hardware import load_hardware
    from scaletrain.plan.planner import layout_name, make_plan
    from scaletrain.plan.search import search

    if cluster.gpu is None:
        return "plan: cluster.gpu is not set (an entry of configs/hardware.yaml): no plan check"
    resolved = check_layout(config, nodes, cluster.gpus_per_node)
    world = resolved.dims.world_size
    hw = load_hardware(cluster.gpu, world, cluster.gpus_per_node)
    plan = make_plan(config, resolved, hw)
    big, gb = plan.largest, 1e9
    if plan.fits:
        eta = config.train.steps * plan.time.step_time_s
        return (
            f"plan: {layout_name(plan)} on {world} x {hw.name}: largest stage {big.stage} "
            f"{big.total_bytes / gb:.1f} GB of {hw.memory_bytes / gb:.1f} GB per rank (margin "
            f"{plan.margin_bytes / gb:.1f} GB), {plan.tokens_per_sec:,.0f} tokens/s, ETA "
            f"{_duration(eta)} for {config.train.steps} steps"
        )
    fitting, _, _ = search(config, resolved, world, hw)
    if fitting:
        best = fitting[0]
        b = best.config
        fix = (
            f"best fitting layout from plan --search: {layout_name(best)} "
            f"({best.tokens_per_sec:,.0f} tokens/s; parallel.tp={b.parallel.tp} "
            f"parallel.pp={b.parallel.pp} parallel.ep={b.parallel.ep} "
            f"parallel.zero_stage={b.parallel.zero_stage} train.micro_batch={b.train.micro_batch}"
            f" model.activation_checkpointing={b.model.activation_checkpointing})"
        )
    else:
        fix = f"no layout of {world} ranks fits (plan --search); add nodes"
    raise ScaletrainError(
        f"plan: stage {big.stage} needs {big.total_bytes / gb:.1f} GB per rank, "
        f"{-plan.margin_bytes / gb:.1f} GB more than the {hw.memory_bytes / gb:.1f} GB of "
        f"{hw.name} ({layout_name(plan)}); {fix}; or pass --no-plan-check"
    )


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def absolute_paths(config: Config, workdir: Path) -> Config:
    """The same config with run, data and checkpoint folders made absolute against workdir."""

    def absolute(path: str) -> str:
        return str(workdir / path) if not Path(path).is_absolute() else path

    train = dataclasses.replace(config.train, run_dir=absolute(config.train.run_dir))
    data = dataclasses.replace(config.data, paths=[absolute(p) for p in config.data.paths])
    ckpt_dir = config.checkpoint.dir
    checkpoint = dataclasses.replace(
        config.checkpoint, dir=absolute(ckpt_dir) if ckpt_dir else None
    )
    return dataclasses.replace(config, train=train, data=data, checkpoint=checkpoint)


def render_job(
    config: Config,
    cluster: ClusterConfig,
    *,
    nodes: int,
    chain: int = 1,
    workdir: Path,
    config_source: str,
    cluster_source: str,
) -> SlurmJob:
    """Check the layout, then render the script and the resolved config (writes nothing)."""
    check_layout(config, nodes, cluster.gpus_per_node)
    if chain < 1:
        raise ConfigError("--chain", f"must be >= 1 (jobs in the chain), got {chain}")
    config = absolute_paths(config, workdir)
    run_dir = Path(config.train.run_dir)
    folder = run_dir / SLURM_DIR
    log_dir = Path(cluster.output_dir) if cluster.output_dir else folder
    if not log_dir.is_absolute():
        log_dir = workdir / log_dir
    requeue = cluster.requeue and chain == 1
    values = {
        "config_source": config_source,
        "cluster_source": cluster_source,
        "job_name": _sbatch_value("job name", run_dir.name),
        "nodes": str(nodes),
        "gpus_per_node": str(cluster.gpus_per_node),
        "resource_lines": "".join(f"#SBATCH {line}\n" for line in _resource_options(cluster)),
        "time": _sbatch_value("cluster.time", cluster.time),
        "signal_lead": str(cluster.signal_lead_seconds),
        "requeue_option": "requeue" if requeue else "no-requeue",
        "log_dir": _sbatch_value("cluster.output_dir", str(log_dir)),
        "workdir": _sbatch_value("workdir", str(workdir)),
        "config": shlex.quote(str(folder / CONFIG)),
        "requeue": "1" if requeue else "0",
        "setup": "\n".join(cluster.setup) or ": # none",
        "env": "\n".join(f"export {k}={shlex.quote(v)}" for k, v in cluster.env.items())
        or ": # none",
        "srun_args": "".join(f"{shlex.quote(a)} " for a in _srun_options(cluster, workdir)),
        "nproc": str(cluster.gpus_per_node),
    }
    return SlurmJob(
        run_dir=run_dir,
        script=folder / SCRIPT,
        config=folder / CONFIG,
        log_dir=log_dir,
        job_name=run_dir.name,
        script_text=render_template(TEMPLATE.read_text(), values),
        config_text=dump_yaml(config),
        chain=chain,
    )


def render_template(template: str, values: dict[str, str]) -> str:
    """Fill `{{ name }}` placeholders; every placeholder needs a value and every value a use."""
    used = set(_PLACEHOLDER.findall(template))
    if used != set(values):
        raise AssertionError(f"template placeholders {sorted(used ^ set(values))} do not match")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _sbatch_value(field: str, value: str) -> str:
    if not value or any(c in value for c in "\n\r"):
        raise ConfigError(field, f"{value!r} cannot go on an #SBATCH line")
    return value


def _resource_options(cluster: ClusterConfig) -> list[str]:
    options = [
        f"--{name}={value}"
        for name, value in (
            ("partition", cluster.partition),
            ("account", cluster.account),
            ("qos", cluster.qos),
            ("cpus-per-task", cluster.cpus_per_task),
            ("mem", cluster.mem),
            ("constraint", cluster.constraint),
        )
        if value is not None
    ]
    if cluster.exclusive:
        options.append("--exclusive")
    options += cluster.sbatch_args
    return [_sbatch_value("cluster.sbatch_args", o) for o in options]


def _srun_options(cluster: ClusterConfig, workdir: Path) -> list[str]:
    options = []
    if cluster.cpus_per_task is not None:  # srun does not inherit it from sbatch (22.05+)
        options.append(f"--cpus-per-task={cluster.cpus_per_task}")
    if cluster.container_image:
        options.append(f"--container-image={cluster.container_image}")
        if cluster.container_mounts:
            options.append(f"--container-mounts={','.join(cluster.container_mounts)}")
        options.append(f"--container-workdir={cluster.container_workdir or workdir}")
    return options + cluster.srun_args


def write_job(job: SlurmJob) -> None:
    """The script (executable), the resolved config and the log folder."""
    job.script.parent.mkdir(parents=True, exist_ok=True)
    job.log_dir.mkdir(parents=True, exist_ok=True)
    job.config.write_text(job.config_text)
    job.script.write_text(job.script_text)
    job.script.chmod(0o755)


def sbatch_commands(job: SlurmJob) -> list[str]:
    """What `--submit` runs, as shell lines (the chain's later jobs wait for the one before)."""
    first = f"sbatch --parsable {shlex.quote(str(job.script))}"
    if job.chain == 1:
        return [first]
    later = f"sbatch --parsable --dependency=afterany:$prev {shlex.quote(str(job.script))}"
    lines = [f"prev=$({first})"]
    lines += [f"prev=$({later})"] * (job.chain - 1)
    return lines


def submit(job: SlurmJob) -> list[str]:
    """sbatch the job (the chain: each after the one before); records the ids; returns them."""
    if shutil.which("sbatch") is None:
        raise ScaletrainError(
            "sbatch not found: run this on a SLURM login node "
            "(or start the one-machine cluster: bash slurm/local-cluster.sh start)"
        )
    ids: list[str] = []
    for index in range(job.chain):
        command = ["sbatch", "--parsable"]
        if ids:
            command.append(f"--dependency=afterany:{ids[-1]}")
        done = subprocess.run([*command, str(job.script)], capture_output=True, text=True)
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise ScaletrainError(f"sbatch failed ({done.returncode}): {reason}")
        job_id = done.stdout.strip().split(";")[0]
        ids.append(job_id)
        record = {
            "job_id": job_id,
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "after": ids[-2] if len(ids) > 1 else None,
            "chain": f"{index + 1}/{job.chain}",
            "script": str(job.script),
            "log": str(job.log_files(job_id)[0]),
        }
        with (job.script.parent / JOBS).open("a") as f:
            f.write(json.dumps(record) + "\n")
    return ids
