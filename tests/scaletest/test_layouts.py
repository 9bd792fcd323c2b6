"""Layout names, the candidate list and the one-line errors of `scaletrain scaletest` (fast)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scaletrain.cli import main
from scaletrain.config import load_config
from scaletrain.errors import ConfigError
from scaletrain.scaletest.layouts import (
    Layout,
    candidates,
    enumerate_layouts,
    parse_layout,
    parse_layouts,
)
from tests.distributed import TINY


def test_names_round_trip_and_default_zero_stage() -> None:
    assert parse_layout("tp1pp1dp2", default_zero=1) == Layout(1, 1, 2, 1, 1)  # the config's
    assert parse_layout("tp1pp1dp4ep2z2", default_zero=0) == Layout(1, 1, 4, 2, 2)
    for name in ("tp1pp1dp2z1", "tp1pp1dp4ep2z2", "tp2pp2dp2z0"):
        assert parse_layout(name, default_zero=3).name == name
    assert parse_layouts("tp2pp1dp1, tp1pp1dp2z1,tp2pp1dp1z0", 0) == [
        Layout(2, 1, 1, 1, 0),
        Layout(1, 1, 2, 1, 1),
    ]


@pytest.mark.parametrize("bad", ["tp2dp2", "tp2pp1dp1x", "TP2PP1DP1", "tp2 pp1 dp1", "ep2"])
def test_bad_names_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError, match="not a layout name"):
        parse_layout(bad, 0)


def test_candidates_cover_every_factorisation() -> None:
    # Written out by hand for 4 ranks: (tp, pp, dp) with tp * pp * dp = 4.
    splits = [(1, 1, 4), (1, 2, 2), (1, 4, 1), (2, 1, 2), (2, 2, 1), (4, 1, 1)]
    dense = {
        (tp, pp, dp, 1, z) for tp, pp, dp in splits for z in ((0, 1, 2, 3) if dp > 1 else (0,))
    }
    got = candidates(4, num_experts=0)
    assert {(c.tp, c.pp, c.dp, c.ep, c.zero) for c in got} == dense
    assert got == sorted(got) and len(got) == len(dense)
    # With experts, every ep dividing dp: dp 4 adds ep 2 and 4, dp 2 adds ep 2.
    moe = {(c.tp, c.pp, c.dp, c.ep) for c in candidates(4, num_experts=4)}
    extra = {(1, 1, 4, 2), (1, 1, 4, 4), (1, 2, 2, 2), (2, 1, 2, 2)}
    assert moe == {(tp, pp, dp, 1) for tp, pp, dp in splits} | extra
    # At dp 1 the config's own stage joins stage 0; at dp > 1 every stage is there anyway.
    zero2 = {c.name for c in candidates(4, num_experts=0, zero_stage=2) if c.dp == 1}
    assert zero2 == {"tp1pp4dp1z0", "tp1pp4dp1z2", "tp2pp2dp1z0", "tp2pp2dp1z2"} | {
        "tp4pp1dp1z0",
        "tp4pp1dp1z2",
    }


def test_enumeration_keeps_what_the_checks_accept(stdlib_data: Path) -> None:
    config = load_config(TINY, [f"data.paths=[{stdlib_data}]"])
    accepted, rejected = enumerate_layouts(config, 4)
    assert sorted(accepted + [r.layout for r in rejected]) == candidates(4, 0)
    names = {layout.name for layout in accepted}
    # tiny has 2 kv heads: tp4 never fits; ZeRO 0-3 at tp1 x dp4 and tp2 x dp2 always do.
    assert {f"tp{t}pp1dp{4 // t}z{z}" for t in (1, 2) for z in range(4)} <= names
    reasons = {r.layout.name: r.reason for r in rejected}
    assert reasons["tp4pp1dp1z0"].startswith("model.num_kv_heads: (2) must be divisible")
    assert all("\n" not in reason for reason in reasons.values())


def test_moe_enumeration_includes_pipelines(stdlib_data: Path, tmp_path: Path) -> None:
    # MoE x PP is a layout like any other now: the checks refuse only ZeRO-2/3 with pp > 1.
    run = tmp_path / "moe.yaml"
    run.write_text(TINY.read_text().replace("model: tiny", "model: tiny-moe", 1))
    config = load_config(run, [f"data.paths=[{stdlib_data}]"])
    assert config.model.num_experts == 4
    accepted, rejected = enumerate_layouts(config, 4)
    names = {layout.name for layout in accepted}
    assert {"tp1pp2dp2z0", "tp1pp2dp2z1", "tp1pp2dp2ep2z1", "tp2pp2dp1z0"} <= names
    reasons = {r.layout.name: r.reason for r in rejected}
    assert reasons["tp1pp2dp2ep2z2"].startswith("parallel.zero_stage")
    assert not any(r.reason.startswith("parallel.pp") and "MoE" in r.reason for r in rejected)


def _cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    code = main(["scaletest", "--config", str(TINY), *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layouts", "tp2xdp2"], "config error: --layouts: 'tp2xdp2' is not a layout name"),
        (["--layouts", "tp2pp1dp1"], "tp2pp1dp1z0: tp * pp * dp = 2, but --world-size is 4"),
        (["--layouts", "tp4pp1dp1"], "model.num_kv_heads: (2) must be divisible by parallel.tp"),
        (["--layouts", ","], "--layouts: is empty"),
        (["--steps", "0"], "--steps: must be >= 1, got 0"),
        (["--tolerance", "0"], "--tolerance: must be > 0"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    args: list[str], message: str, stdlib_data: Path, tmp_path: Path, capsys
) -> None:
    paths = [f"data.paths=[{stdlib_data}]", f"train.run_dir={tmp_path}"]
    code, err = _cli(capsys, "--world-size", "4", *args, *paths)
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "scaletest").exists()  # nothing started


def test_no_valid_layout_names_the_first_reason(stdlib_data: Path, tmp_path: Path, capsys) -> None:
    paths = [f"data.paths=[{stdlib_data}]", f"train.run_dir={tmp_path}"]
    code, err = _cli(capsys, "--world-size", "3", *paths)  # 3 ranks: tp3 / pp3 / dp3 all fail
    assert code == 2
    assert err.startswith("config error: --world-size: no layout of 3 rank(s) passes")
