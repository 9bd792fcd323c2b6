"""No code from a checkpoint file runs unless the user opted in, whatever the entry point.

The attacker's checkpoint is a real one (one world-of-one run saves it) with a `__reduce__`
payload planted into a torch file and the manifest's checksums recomputed, so it verifies
(`payload.py`). It goes through `scaletrain train` (resume=auto with `checkpoint.dir` pointing
at it, resume=<path>, a resume on another layout, a planted universal copy), `ckpt list`,
`verify` and `consolidate`; the marker file the payload would create never appears, and each
refusal is one line, exit 2. The opt-ins (`checkpoint.allow_external_pickle`, `--allow-pickle`)
do unpickle it. The train commands share one process (`entry_points_run.py`).
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scaletrain.checkpoint.convert import convert, universal_folder
from scaletrain.checkpoint.safe_load import (
    CLI_OPT_IN,
    TRAIN_OPT_IN,
    UnsafeCheckpoint,
    load,
    unsafe_file,
    weights_only_loading,
)
from scaletrain.cli import main
from tests.checkpoint.payload import REFUSED_GLOBAL, Payload, copy_run, plant
from tests.distributed import REPO, TINY, rank_env, run_cli

STEP = "step_00000002"
MODEL_FILE = "mp_rank_00_model_states.pt"
OPTIM_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
SAVED = ("parallel.zero_stage=1", "train.steps=2", "train.eval_interval=0")
OPT_IN = "checkpoint.allow_external_pickle=true"


def refusal(path: Path, opt_in: str) -> str:
    return (
        f"{path} holds objects that weights-only loading refuses (global {REFUSED_GLOBAL}); "
        f"unpickling them can run code from the file: {opt_in} if you trust it"
    )


def payload_file(path: Path, marker: Path) -> Path:
    torch.save({"weight": torch.ones(3), "note": Payload(marker)}, path)
    return path


# ---- in one process, no checkpoint needed --------------------------------------------------
def test_a_payload_file_is_refused_in_one_line(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = payload_file(tmp_path / "evil.pt", marker)
    assert unsafe_file(path) == refusal(path, TRAIN_OPT_IN)
    with pytest.raises(UnsafeCheckpoint) as refused:
        load(path, opt_in=CLI_OPT_IN)
    assert str(refused.value) == refusal(path, CLI_OPT_IN)
    assert not marker.exists()
    clean = tmp_path / "clean.pt"
    torch.save({"weight": torch.arange(4.0), "step": 3, "rng": (3, tuple(range(5)), None)}, clean)
    assert unsafe_file(clean) is None
    assert torch.equal(load(clean)["weight"], torch.arange(4.0))
    load(path, allow_pickle=True)  # the opt-in: full unpickling, which runs the payload
    assert marker.read_text() == "pwned"


def test_deepspeeds_own_loads_are_forced_weights_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeepSpeed's checkpoint engine asks for weights_only=False (as do ds_to_universal and
    zero_to_fp32); inside `weights_only_loading` torch loads weights-only regardless, even
    where the user's environment asked torch for the opposite."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    marker = tmp_path / "marker"
    path = payload_file(tmp_path / "evil.pt", marker)
    engine = TorchCheckpointEngine()
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with weights_only_loading(), pytest.raises(pickle.UnpicklingError, match=REFUSED_GLOBAL):
        engine.load(str(path), map_location="cpu")
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"
    with weights_only_loading(allow_pickle=True):
        engine.load(str(path), map_location="cpu")
    assert marker.exists()  # what the forcing prevents: DeepSpeed alone runs the payload


# ---- a real checkpoint ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(stdlib_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoints folder of a real run (world of one, ZeRO-1, fp32), saved at step 2."""
    run_dir = tmp_path_factory.mktemp("own") / "run"
    config = ("--config", str(TINY), f"data.paths=[{stdlib_data}]", f"train.run_dir={run_dir}")
    done = run_cli("train", *config, *SAVED)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir / "checkpoints"


def attacker_copy(saved: Path, dest: Path, marker: Path, relative: str = MODEL_FILE) -> Path:
    """A run folder someone else wrote: our checkpoint with a payload, `latest` and all."""
    root = copy_run(saved, dest / "checkpoints")
    plant(root / STEP, relative, marker)
    return root


@pytest.mark.slow
def test_ckpt_commands_never_unpickle_a_payload(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "marker"
    root = attacker_copy(saved, tmp_path / "downloads", marker)
    folder = root / STEP
    assert main(["ckpt", "list", str(root)]) == 0  # list and verify read no pickles at all
    assert capsys.readouterr().out.splitlines()[1].split()[-1] == "complete"
    assert main(["ckpt", "verify", str(folder)]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {folder} step 2, ")
    out = tmp_path / "model.safetensors"
    assert main(["ckpt", "consolidate", str(folder), str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [refusal(folder / MODEL_FILE, CLI_OPT_IN)]
    assert not marker.exists() and not out.exists()

    # The payload in an optimizer shard, which zero_to_fp32 reads itself.
    shard_marker = tmp_path / "shard-marker"
    shard_root = attacker_copy(saved, tmp_path / "shard", shard_marker, OPTIM_FILE)
    assert main(["ckpt", "consolidate", str(shard_root / STEP), str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        refusal(shard_root / STEP / OPTIM_FILE, CLI_OPT_IN)
    ]
    assert not shard_marker.exists() and not out.exists()

    # Our own checkpoint, copied anywhere, needs no opt-in: nothing in it is refused.
    elsewhere = copy_run(saved, tmp_path / "elsewhere" / "ckpts")
    assert main(["ckpt", "consolidate", str(elsewhere / STEP), str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: 15 tensors, ")

    assert main(["ckpt", "consolidate", str(folder), str(out), "--allow-pickle", "--force"]) == 0
    assert marker.read_text() == "pwned"  # the opt-in unpickles fully


@pytest.mark.slow
def test_the_converters_own_loads_refuse_a_payload(saved: Path, tmp_path: Path) -> None:
    """Past our own check, `ds_to_universal` reading a planted optimizer shard is refused by
    torch: the forcing covers every load in the process, not a list of call sites."""
    marker = tmp_path / "marker"
    root = attacker_copy(saved, tmp_path / "downloads", marker, OPTIM_FILE)
    with pytest.raises(pickle.UnpicklingError, match=REFUSED_GLOBAL):
        convert(root / STEP, universal_folder(root, root / STEP))
    assert not marker.exists()


@pytest.mark.slow
def test_train_entry_points_never_unpickle_a_payload(
    saved: Path, stdlib_data: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    evil = attacker_copy(saved, tmp_path / "downloads", marker)
    model_file = evil / STEP / MODEL_FILE
    # A clean checkpoint whose reused universal copy (for a resume at ZeRO-2) holds the payload.
    clean = copy_run(saved, tmp_path / "clean" / "checkpoints")
    universal = universal_folder(clean, clean / STEP)
    convert(clean / STEP, universal)
    planted = universal / "zero" / "optimizer_state.pt"
    state = load(planted)
    state["note"] = Payload(marker)
    torch.save(state, planted)

    def train(name: str, *overrides: str) -> list[str]:
        run_dir = tmp_path / name
        config = ["--config", str(TINY), f"data.paths=[{stdlib_data}]", f"train.run_dir={run_dir}"]
        return ["train", *config, *SAVED, *overrides]

    commands = {
        "auto": train("auto", f"checkpoint.dir={evil}"),
        "path": train("path", f"checkpoint.resume={evil / STEP}"),
        "reshard": train("reshard", f"checkpoint.dir={evil}", "parallel.zero_stage=2"),
        "universal": train("universal", f"checkpoint.dir={clean}", "parallel.zero_stage=2"),
        "opt-in": train("opt-in", f"checkpoint.dir={evil}", OPT_IN),
    }
    argv_file, results_file = tmp_path / "argv.json", tmp_path / "results.json"
    argv_file.write_text(json.dumps(list(commands.values())))
    script = REPO / "tests" / "checkpoint" / "entry_points_run.py"
    done = subprocess.run(
        [sys.executable, str(script), str(results_file), str(marker), str(argv_file)],
        cwd=REPO,
        env=rank_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = dict(zip(commands, json.loads(results_file.read_text()), strict=True))
    got = {name: (r["code"], r["stderr"][-1], r["marker"]) for name, r in results.items()}
    refused = (2, refusal(model_file, TRAIN_OPT_IN), False)
    assert got == {
        "auto": refused,
        "path": refused,
        "reshard": refused,
        "universal": (2, refusal(planted, TRAIN_OPT_IN), False),
        "opt-in": (0, got["opt-in"][1], True),  # loaded, so the payload ran
    }
    for name in ("auto", "path", "reshard", "universal"):
        assert not any("Traceback" in line for line in results[name]["stderr"]), name
    assert "resumed from" in "\n".join(results["opt-in"]["stderr"])


# ---- how consolidate writes (where it refuses to: tests/checkpoint/test_tools.py) -----------
@pytest.mark.slow
def test_consolidate_writes_with_the_users_umask(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = saved / STEP
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("replace me")
    old = os.umask(0o027)
    try:
        out = tmp_path / "out" / "model.safetensors"
        assert main(["ckpt", "consolidate", str(folder), str(out)]) == 0
        assert main(["ckpt", "consolidate", str(folder), str(unrelated), "--force"]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    assert stat.S_IMODE(out.stat().st_mode) == 0o640  # safetensors alone writes 0600
    assert stat.S_IMODE(unrelated.stat().st_mode) == 0o640
    written, replaced = load_file(out), load_file(unrelated)  # same checkpoint, same weights
    assert len(written) == 15 and sorted(written) == sorted(replaced)
    assert all(torch.equal(written[name], replaced[name]) for name in written)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.safetensors"]  # no temp left
