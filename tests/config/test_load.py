"""Loading configs: every shipped YAML, overrides and their types, model composition, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from scaletrain.cli import main
from scaletrain.config import Config, check_config, dump_yaml, from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ALL_YAML = sorted(CONFIGS.rglob("*.yaml")) + sorted(CONFIGS.rglob("*.yml"))
MODEL_FILES = [p for p in ALL_YAML if p.parent.name == "models"]
RUN_FILES = [p for p in ALL_YAML if p.parent.name == "runs"]
CLUSTER_FILES = [p for p in ALL_YAML if p.parent.name == "clusters"]
VOCAB_WITHOUT_DATA = 4096


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(CONFIGS)) for p in paths]


def _checkable(config: Config) -> Config:
    """check_data=False reads no metadata.json, so a null vocab_size needs a stand-in."""
    if config.model.vocab_size is None:
        config.model.vocab_size = VOCAB_WITHOUT_DATA
    return config


def test_configs_folder_is_found() -> None:
    assert MODEL_FILES, f"no model files under {CONFIGS}"


@pytest.mark.parametrize("path", RUN_FILES, ids=_ids(RUN_FILES))
def test_shipped_run_config_loads_and_checks(path: Path) -> None:
    config = _checkable(load_config(path))
    p = config.parallel
    world_size = p.tp * p.pp * (p.dp or 1)  # always a valid size for the file's own layout
    resolved = check_config(config, world_size=world_size, check_data=False)
    assert resolved.dims.world_size == world_size
    assert resolved.global_batch == resolved.micro_batch * resolved.grad_accum * resolved.dims.dp


def test_every_shipped_yaml_is_a_run_model_or_cluster_file() -> None:
    hardware = {CONFIGS / "hardware.yaml"}  # the device table, loaded by tests/plan
    assert set(ALL_YAML) == set(RUN_FILES) | set(MODEL_FILES) | set(CLUSTER_FILES) | hardware


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=_ids(CLUSTER_FILES))
def test_shipped_cluster_file_loads(path: Path) -> None:
    from scaletrain.launch.cluster import load_cluster

    cluster = load_cluster(str(path))
    assert cluster.gpus_per_node >= 1


@pytest.mark.parametrize("path", MODEL_FILES, ids=_ids(MODEL_FILES))
def test_shipped_model_config_loads_and_checks(path: Path, tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"model": {"base": str(path)}}))
    config = _checkable(load_config(run))
    for name, value in yaml.safe_load(path.read_text()).items():
        assert getattr(config.model, name) == value, name
    config.train.seq_len = min(config.train.seq_len, config.model.max_seq_len)
    check_config(config, world_size=1, check_data=False)


@pytest.mark.parametrize("path", RUN_FILES, ids=_ids(RUN_FILES))
def test_shipped_run_config_round_trips(path: Path) -> None:
    config = load_config(path)
    assert from_dict(yaml.safe_load(dump_yaml(config))) == config


def test_overrides_set_values_with_their_types(run_file: Path) -> None:
    config = load_config(
        run_file,
        [
            "train.steps=20",
            "optim.lr=1e-3",  # PyYAML reads this as the string '1e-3'
            "optim.min_lr=0",  # an int where a float belongs
            "model.num_kv_heads=null",
            "parallel.dp=",
            "data.shuffle=false",
            "data.weights=[1, 2.5]",
            "data.paths=[a, b]",
            "precision.dtype=bf16",
            "train.run_dir=runs/x",
        ],
    )
    assert config.train.steps == 20 and type(config.train.steps) is int
    assert config.optim.lr == 1e-3 and type(config.optim.lr) is float
    assert config.optim.min_lr == 0.0 and type(config.optim.min_lr) is float
    assert config.model.num_kv_heads is None
    assert config.parallel.dp is None
    assert config.data.shuffle is False
    assert config.data.weights == [1.0, 2.5]
    assert all(type(w) is float for w in config.data.weights)
    assert config.data.paths == ["a", "b"]
    assert config.precision.dtype == "bf16"
    assert config.train.run_dir == "runs/x"


def test_override_wins_over_file_and_keeps_the_rest(run_file: Path) -> None:
    base = load_config(run_file)
    changed = load_config(run_file, ["train.global_batch=32"])
    assert changed.train.global_batch == 32
    changed.train.global_batch = base.train.global_batch
    assert changed == base


def test_override_into_empty_section(tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text("train:\noptim:\n")
    config = load_config(run, ["train.steps=7"])
    assert config.train.steps == 7
    assert config.optim == Config().optim


def test_no_file_gives_defaults() -> None:
    assert load_config(None) == Config()
    assert load_config(None, ["train.seed=7"]).train.seed == 7


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    run = tmp_path / "empty.yaml"
    run.write_text("# nothing here\n")
    assert load_config(run) == Config()


def test_config_show_round_trips(run_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overrides = ["train.steps=20", "optim.lr=1e-3", "precision.dtype=bf16"]
    assert main(["config", "show", "--config", str(run_file), *overrides]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    shown = from_dict(yaml.safe_load(out))
    assert shown == load_config(run_file, overrides)
    assert (shown.train.steps, shown.optim.lr) == (20, 1e-3)

    # The printed YAML is itself a valid run file.
    again = run_file.parent / "shown.yaml"
    again.write_text(out)
    assert load_config(again) == shown


def _preset(repo_root: Path, name: str) -> dict:
    return yaml.safe_load((repo_root / "configs" / "models" / f"{name}.yaml").read_text())


def test_model_by_name(tmp_path: Path, repo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`model: tiny` in a run file outside configs/ finds configs/models/ from the repo root."""
    monkeypatch.chdir(repo_root)
    run = tmp_path / "run.yaml"
    run.write_text("model: tiny\n")
    config = load_config(run)
    tiny = _preset(repo_root, "tiny")
    assert {name: getattr(config.model, name) for name in tiny} == tiny


def test_model_base_with_overrides(
    tmp_path: Path, repo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(repo_root)
    run = tmp_path / "run.yaml"
    run.write_text("model:\n  base: tiny\n  num_layers: 8\n")
    config = load_config(run, ["model.max_seq_len=128"])
    expected = {**_preset(repo_root, "tiny"), "num_layers": 8, "max_seq_len": 128}
    assert {name: getattr(config.model, name) for name in expected} == expected


def test_model_base_on_the_command_line(
    tmp_path: Path, repo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`model.base=` is the override of `model: {base: ...}`: a preset or a file, with the
    file's and the command line's fields on top; `model: NAME` takes field overrides too."""
    monkeypatch.chdir(repo_root)
    run = tmp_path / "run.yaml"
    run.write_text("model:\n  base: tiny\n  num_layers: 8\n")
    small = _preset(repo_root, "small")
    config = load_config(run, ["model.base=small", "model.max_seq_len=128"])
    expected = {**small, "num_layers": 8, "max_seq_len": 128}
    assert {name: getattr(config.model, name) for name in expected} == expected
    (tmp_path / "wide.yaml").write_text("hidden_size: 512\nnum_heads: 8\n")
    config = load_config(None, [f"model.base={tmp_path / 'wide.yaml'}", "model.num_heads=16"])
    assert (config.model.hidden_size, config.model.num_heads) == (512, 16)
    run.write_text("model: tiny\n")
    config = load_config(run, ["model.num_layers=5"])
    assert (config.model.hidden_size, config.model.num_layers) == (
        _preset(repo_root, "tiny")["hidden_size"],
        5,
    )


def test_model_file_next_to_runs_folder(tmp_path: Path) -> None:
    """A run in <dir>/runs/ finds <dir>/models/NAME.yaml whatever the working directory."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.yaml").write_text("hidden_size: 32\nnum_heads: 2\n")
    (tmp_path / "runs").mkdir()
    run = tmp_path / "runs" / "run.yaml"
    run.write_text("model: {base: mine, num_heads: 4}\n")
    config = load_config(run)
    assert (config.model.hidden_size, config.model.num_heads) == (32, 4)


def test_model_file_by_relative_path(tmp_path: Path) -> None:
    (tmp_path / "shapes").mkdir()
    (tmp_path / "shapes" / "wide.yaml").write_text("hidden_size: 512\n")
    run = tmp_path / "run.yaml"
    run.write_text("model: shapes/wide.yaml\n")
    assert load_config(run).model.hidden_size == 512


def test_config_check_ok(run_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["config", "check", "--config", str(run_file), "--world-size", "4"])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert out == (
        "ok: tp1pp1dp4 on 4 rank(s), global batch 16 = micro 2 x accum 2 x dp 4, "
        "vocab 300 (padded 384)\n"
    )


def test_config_check_ok_with_tp(run_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["config", "check", "--config", str(run_file), "--world-size", "4"]
    code = main([*argv, "parallel.tp=2", "train.global_batch=null", "train.grad_accum=3"])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert out == (
        "ok: tp2pp1dp2 on 4 rank(s), global batch 12 = micro 2 x accum 3 x dp 2, "
        "vocab 300 (padded 384)\n"
    )


def test_check_config_derives_values(run_file: Path) -> None:
    config = load_config(run_file, ["parallel.tp=2", "model.vocab_size=1000"])
    resolved = check_config(config, world_size=8)
    assert (resolved.dims.tp, resolved.dims.pp, resolved.dims.dp) == (2, 1, 4)
    assert (resolved.micro_batch, resolved.grad_accum, resolved.global_batch) == (2, 2, 16)
    assert (resolved.vocab_size, resolved.padded_vocab_size) == (1000, 1024)
