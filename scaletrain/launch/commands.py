"""The `scaletrain launch local | slurm | status` actions behind the CLI."""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from scaletrain.config import load_config
from scaletrain.logs import setup_logging


def launch(args: argparse.Namespace) -> int:
    setup_logging()
    if args.action == "local":
        from scaletrain.launch.torchrun import run_local
        from scaletrain.train.preflight import preflight_launch

        config = load_config(args.config, args.overrides)
        preflight_launch(config, args.nproc)  # one line and exit 2 before any rank starts
        return run_local(args.nproc, args.config, args.overrides)
    if args.action == "status":
        from scaletrain.launch.status import run_status

        print("\n".join(run_status(Path(args.run_dir))))
        return 0
    return _slurm(args)


def _slurm(args: argparse.Namespace) -> int:
    from scaletrain.launch.cluster import cluster_path, load_cluster, split_overrides
    from scaletrain.launch.slurm import plan_check, render_job, sbatch_commands, submit, write_job

    run_overrides, cluster_overrides = split_overrides(args.overrides)
    config = load_config(args.config, run_overrides)
    cluster = load_cluster(args.cluster, cluster_overrides)
    nodes = cluster.nodes if args.nodes is None else args.nodes
    job = render_job(
        config,
        cluster,
        nodes=nodes,
        chain=args.chain,
        workdir=Path(os.getcwd()),
        config_source=" ".join(shlex.quote(w) for w in [args.config, *run_overrides]),
        cluster_source=" ".join(
            shlex.quote(w) for w in [str(cluster_path(args.cluster)), *cluster_overrides]
        ),
    )
    # Refuses (exit 2, nothing written) when the plan's largest stage does not fit.
    if args.no_plan_check:
        summary = "plan: not checked (--no-plan-check)"
    else:
        summary = plan_check(config, cluster, nodes)
    if args.dry_run:
        print(job.script_text, end="")
        print(f"\n# {summary}\n# submit with:\n" + "\n".join(sbatch_commands(job)))
        return 0
    print(summary)
    write_job(job)
    if not args.submit:
        print(f"wrote {job.script} and {job.config}; submit with:")
        print("\n".join(sbatch_commands(job)))
        return 0
    ids = submit(job)
    for index, job_id in enumerate(ids):
        after = f" (runs after {ids[index - 1]})" if index else ""
        print(f"submitted job {job_id}{after}")
    stdout, stderr = job.log_files(ids[0])
    print(f"log: {stdout} (stderr: {stderr.name}; jobs of a chain: {job.job_name}-<id>.out)")
    print(f"metrics: {job.run_dir / 'metrics.jsonl'}")
    print(f"status: scaletrain launch status {job.run_dir}")
    return 0
