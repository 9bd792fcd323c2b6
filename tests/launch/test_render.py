"""The rendered sbatch script: golden copies for the two GPU cluster examples, `bash -n` and
shellcheck, the layout check before anything is written, and a 128-node x 8-GPU request that
SLURM itself accepts (`sbatch --test-only` against fake CLOUD nodes)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from scaletrain.cli import main
from scaletrain.config import check_config, load_config
from scaletrain.config.reference import field_docs
from scaletrain.errors import ConfigError
from scaletrain.launch.cluster import CLUSTERS_DIR, ClusterConfig, load_cluster
from scaletrain.launch.slurm import render_job, write_job
from scaletrain.plan.hardware import load_hardware
from scaletrain.plan.planner import make_plan
from tests.distributed import REPO

GOLDEN = Path(__file__).parent / "golden"
QUICKSTART = REPO / "configs" / "runs" / "quickstart.yaml"
WORKDIR = Path("/shared/scaletrain")
# A cluster's data is often not readable from where the script is written: vocab_size given.
GPU_RUNS = {
    "h100-ib-pyxis": (16, ["parallel.tp=2", "train.global_batch=1024"]),
    "a100-modules": (4, ["train.global_batch=256"]),
}
COMMON = ["data.paths=[/shared/data/stdlib]", "model.vocab_size=4096", "train.run_dir=runs/qs"]


def render(cluster: str, nodes: int, overrides: list[str], cluster_overrides=()):
    config = load_config(QUICKSTART, [*COMMON, *overrides])
    return render_job(
        config,
        load_cluster(cluster, list(cluster_overrides)),
        nodes=nodes,
        workdir=WORKDIR,
        config_source="configs/runs/quickstart.yaml " + " ".join([*COMMON, *overrides]),
        cluster_source=f"configs/clusters/{cluster}.yaml",
    )


def check_shell(text: str, tmp_path: Path) -> None:
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    subprocess.run(["bash", "-n", str(script)], check=True)
    lint = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


@pytest.mark.slurm
@pytest.mark.parametrize("cluster", sorted(GPU_RUNS))
def test_gpu_cluster_script_matches_golden_and_passes_shellcheck(
    cluster: str, slurm_cluster: str, tmp_path: Path
) -> None:
    nodes, overrides = GPU_RUNS[cluster]
    job = render(cluster, nodes, overrides)
    golden = GOLDEN / f"{cluster}.sbatch"
    assert job.script_text == golden.read_text(), (
        f"{golden} differs; if the change is intended, write the new script there"
    )
    check_shell(job.script_text, tmp_path)
    gpus = load_cluster(cluster).gpus_per_node
    text = job.script_text
    for line in [
        "#SBATCH --job-name=qs",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --output=/shared/scaletrain/runs/qs/slurm/%x-%j.out",
        "#SBATCH --error=/shared/scaletrain/runs/qs/slurm/%x-%j.err",
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        f'  python3 -m scaletrain.launch.agent --nnodes="$SLURM_NNODES" --nproc-per-node={gpus} \\',
        '  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" '
        '--rdzv-id="$SLURM_JOB_ID" \\',
        '  -m scaletrain train --config "$CONFIG" &',
        "CONFIG=/shared/scaletrain/runs/qs/slurm/config.yaml",
        "trap 'forward USR1' USR1",
        '  scontrol requeue "$SLURM_JOB_ID" || say "requeue refused: submit the job again to '
        'resume"',
    ]:
        assert line in text, line
    # The resolved config is the one the job trains, with absolute paths.
    resolved = job.config_text
    assert "run_dir: /shared/scaletrain/runs/qs" in resolved
    assert "- /shared/data/stdlib" in resolved


def test_h100_example_runs_in_its_container_with_the_nccl_settings() -> None:
    nodes, overrides = GPU_RUNS["h100-ib-pyxis"]
    text = render("h100-ib-pyxis", nodes, overrides).script_text
    assert "#SBATCH --signal=B:USR1@600" in text
    assert "#SBATCH --exclusive" in text and "#SBATCH --mem=0" in text
    assert "#SBATCH --switches=1@00:10:00" in text
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert "--cpus-per-task=96 --container-image=/shared/images/scaletrain+cuda12.sqsh" in srun
    assert "--container-mounts=/shared:/shared --container-workdir=/shared/scaletrain" in srun
    assert "export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7" in text
    assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600" in text


def test_chain_turns_requeue_off() -> None:
    config = load_config(QUICKSTART, [*COMMON, "train.global_batch=256"])
    job = render_job(
        config,
        load_cluster("a100-modules"),
        nodes=4,
        chain=3,
        workdir=WORKDIR,
        config_source="x",
        cluster_source="y",
    )
    assert "#SBATCH --no-requeue" in job.script_text and "REQUEUE=0" in job.script_text


def test_wrong_node_count_is_one_config_error_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    code = main(
        [
            "launch", "slurm", "--config", str(QUICKSTART), "--cluster", "h100-ib-pyxis",
            "--nodes", "3", *COMMON, f"train.run_dir={run_dir}", "parallel.tp=2",
            "parallel.dp=8",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        "config error: --nodes: 3 node(s) x 8 GPUs per node = 24 ranks, but tp (2) x pp (1) x "
        "dp (8) = 16; use --nodes 2\n"
    )
    assert not run_dir.exists()


@pytest.mark.parametrize("nodes", ["0", "-3"])
def test_nodes_below_one_is_refused_naming_nodes(
    nodes: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    argv = ["launch", "slurm", "--config", str(QUICKSTART), "--cluster", "h100-ib-pyxis"]
    code = main([*argv, "--nodes", nodes, "--dry-run", *COMMON, f"train.run_dir={run_dir}"])
    assert (code, capsys.readouterr()) == (
        2,
        ("", f"config error: --nodes: must be >= 1, got {nodes}\n"),
    )
    assert not run_dir.exists()


def test_cluster_file_with_a_key_twice_is_refused(tmp_path: Path) -> None:
    twice = tmp_path / "twice.yaml"
    twice.write_text("partition: gpu\nnodes: 2\ngpus_per_node: 8\nnodes: 4\n")
    with pytest.raises(ConfigError) as refused:
        load_cluster(str(twice))
    assert str(refused.value) == (
        f"config error: --cluster: '{twice}': key 'nodes' is given twice (lines 2 and 4); keep one"
    )


def test_bad_cluster_values_are_one_line_errors() -> None:
    bad = Path(__file__).parent / "golden" / "unquoted-time.yaml"
    with pytest.raises(Exception, match=r"cluster.time: write it as a quoted string"):
        load_cluster(str(bad))  # YAML 1.1 reads `time: 4:00:00` as 14400
    assert load_cluster("local", ["cluster.time=4:00:00"]).time == "4:00:00"  # kept as written
    with pytest.raises(Exception, match=r"cluster.gpus_per_node: must be >= 1, got 0"):
        load_cluster("local", ["cluster.gpus_per_node=0"])
    with pytest.raises(Exception, match=r"cluster.gpus: unknown field"):
        load_cluster("local", ["cluster.gpus=8"])


def test_every_cluster_file_loads_and_every_field_is_documented() -> None:
    names = sorted(p.stem for p in CLUSTERS_DIR.glob("*.yaml"))
    assert names == ["a100-modules", "h100-ib-pyxis", "local"]
    for name in names:
        assert isinstance(load_cluster(name), ClusterConfig)
    docs = field_docs(ClusterConfig)
    assert all(docs.get(f) for f in ClusterConfig.__dataclass_fields__), docs.keys()


@pytest.mark.slurm
def test_128_nodes_x_8_gpus_pass_sbatch_test_only(slurm_cluster: str, tmp_path: Path) -> None:
    config = load_config(
        QUICKSTART,
        [*COMMON, f"train.run_dir={tmp_path / 'big'}", "parallel.tp=2", "train.global_batch=4096"],
    )
    cluster = load_cluster(
        "local", ["cluster.partition=fake", "cluster.gpus_per_node=8", "cluster.cpus_per_task=96"]
    )
    job = render_job(
        config, cluster, nodes=128, workdir=tmp_path, config_source="x", cluster_source="y"
    )
    write_job(job)

    def test_only(*options: str) -> subprocess.CompletedProcess:
        command = ["sbatch", "--test-only", *options, str(job.script)]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    ok = test_only()
    assert ok.returncode == 0, ok.stderr
    assert "on nodes fake[001-128] in partition fake" in ok.stderr
    too_many = test_only("--nodes=129")
    assert too_many.returncode != 0
    assert "Requested node configuration is not available" in too_many.stderr
    too_wide = test_only("--gpus-per-node=9")
    assert too_wide.returncode != 0
    assert "Requested node configuration is not available" in too_wide.stderr


@pytest.mark.slurm
def test_shell_scripts_pass_shellcheck(slurm_cluster: str) -> None:
    scripts = [
        REPO / "slurm" / "local-cluster.sh",
        REPO / "launch" / "test.sh",
        REPO / ".ci" / "run",
    ]
    lint = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


# Llama 3 8B at 8k tokens on one 8 x H100 node: ZeRO-1 with 8 sequences per micro-batch needs
# far more than 80 GB per rank; `launch slurm` must refuse before it writes anything.
BIG = [
    *COMMON,
    "model.base=llama3-8b",
    "model.vocab_size=128256",
    "precision.dtype=bf16",
    "train.seq_len=8192",
    "train.global_batch=64",
]
SLURM = ["launch", "slurm", "--config", str(QUICKSTART), "--cluster", "h100-ib-pyxis"]


def test_launch_slurm_prints_the_plan_of_the_job(capsys: pytest.CaptureFixture) -> None:
    nodes, overrides = GPU_RUNS["h100-ib-pyxis"]
    assert main([*SLURM, "--nodes", str(nodes), "--dry-run", *COMMON, *overrides]) == 0
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.startswith("# plan: ")]
    # The numbers are the planner's for this job: 16 nodes x 8 H100, tp2 -> dp64.
    config = load_config(QUICKSTART, [*COMMON, *overrides])
    resolved = check_config(config, 128, check_data=False)  # the data is on the cluster
    plan = make_plan(config, resolved, load_hardware("H100-SXM", 128, 8))
    big = plan.largest
    eta = config.train.steps * plan.time.step_time_s
    assert line == (
        f"# plan: tp2pp1dp64z1 mb8 ac=none on 128 x H100-SXM: largest stage 0 "
        f"{big.total_bytes / 1e9:.1f} GB of 80.0 GB per rank (margin "
        f"{plan.margin_bytes / 1e9:.1f} GB), {plan.tokens_per_sec:,.0f} tokens/s, ETA "
        f"{eta:.0f} s for 400 steps"
    )
    assert 0 < big.total_bytes < 80e9 and eta < 60  # a small model: seconds, not hours


def test_a_job_that_does_not_fit_is_refused_unless_no_plan_check(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    argv = [*SLURM, "--nodes", "1", *BIG, f"train.run_dir={run_dir}"]
    assert main(argv) == 2
    assert capsys.readouterr() == (
        "",
        "plan: stage 0 needs 590.7 GB per rank, 510.7 GB more than the 80.0 GB of H100-SXM "
        "(tp1pp1dp8z1 mb8 ac=none); best fitting layout from plan --search: tp2pp1dp4z2 mb1 "
        "ac=none (76,326 tokens/s; parallel.tp=2 parallel.pp=1 parallel.ep=1 "
        "parallel.zero_stage=2 train.micro_batch=1 model.activation_checkpointing=none); or "
        "pass --no-plan-check\n",
    )
    assert not run_dir.exists()  # refused before anything was written
    # The layout it names fits: the same command with it prints the plan and writes the job.
    fix = ["parallel.tp=2", "parallel.zero_stage=2", "train.micro_batch=1"]
    assert main([*argv, *fix]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("plan: tp2pp1dp4z2 mb1 ac=none on 8 x H100-SXM: largest stage 0 ")
    assert "76,326 tokens/s" in first
    # --no-plan-check writes the job that does not fit.
    other = tmp_path / "other"
    argv = [*SLURM, "--nodes", "1", *BIG, f"train.run_dir={other}", "--no-plan-check"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["plan: not checked (--no-plan-check)", f"wrote {other}/slurm/job.sbatch "
                       f"and {other}/slurm/config.yaml; submit with:"]  # fmt: skip
    assert (other / "slurm" / "job.sbatch").is_file()


def test_cluster_gpu_names_a_hardware_entry(capsys: pytest.CaptureFixture) -> None:
    assert load_cluster("h100-ib-pyxis").gpu == "H100-SXM"
    assert load_cluster("a100-modules").gpu == "A100-80GB"
    with pytest.raises(ConfigError) as refused:
        load_cluster("local", ["cluster.gpu=V100"])
    assert str(refused.value).startswith(
        "config error: cluster.gpu: 'V100' is not in configs/hardware.yaml; known: A100-80GB, "
    )
    # No gpu: the job is written without a plan check, and the output says so.
    argv = [*SLURM, "--nodes", "1", "--dry-run", *BIG, "cluster.gpu=null"]
    assert main(argv) == 0
    unset = "# plan: cluster.gpu is not set (an entry of configs/hardware.yaml): no plan check"
    assert unset in capsys.readouterr().out.splitlines()
