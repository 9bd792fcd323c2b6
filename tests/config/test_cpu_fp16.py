"""fp16 on a CPU without oneDNN fp16 kernels: one line from `config check` and `train`, not
DeepSpeed's "Type fp16 is not supported on your device" traceback from inside the ranks.

Machines of this kind differ in CPU model, so the missing capability is simulated: in-process
by making torch's query say no, and in a real process by capping oneDNN's instruction set
below AVX512-FP16 (`ONEDNN_MAX_CPU_ISA`), which is what torch and DeepSpeed then see.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scaletrain.cli import main
from scaletrain.config import check_config, load_config
from scaletrain.config.precision import cpu_lacks_fp16

REFUSAL = (
    "config error: precision.dtype: fp16 on CPU ranks needs oneDNN fp16 kernels (AVX512-FP16 "
    "or AMX-FP16), which this CPU lacks; use precision.dtype=bf16 or precision.dtype=fp32\n"
)


@pytest.fixture
def no_onednn_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process answers as a CPU without oneDNN fp16 does."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)
    assert cpu_lacks_fp16()


@pytest.mark.usefixtures("no_onednn_fp16")
def test_config_check_and_train_refuse_fp16_in_one_line(
    run_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    check = ["config", "check", "--config", str(run_file), "--world-size", "2"]
    assert main([*check, "precision.dtype=fp16"]) == 2
    assert capsys.readouterr() == ("", REFUSAL)
    train = ["train", "--config", str(run_file), "precision.dtype=fp16"]
    assert main(train) == 2
    assert capsys.readouterr() == ("", REFUSAL)
    assert not (run_file.parent / "run").exists()  # refused before the run dir was made
    for dtype in ("bf16", "fp32"):  # the two ways out pass
        assert main([*check, f"precision.dtype={dtype}"]) == 0
        assert capsys.readouterr().out.startswith("ok: ")


@pytest.mark.usefixtures("no_onednn_fp16")
def test_slurm_rendering_does_not_judge_the_cluster_by_this_cpu(run_file: Path) -> None:
    """`launch slurm` checks for ranks on other machines: this CPU says nothing about theirs."""
    config = load_config(run_file, ["precision.dtype=fp16"])
    assert check_config(config, 2, ranks_here=False).dims.dp == 2
    with pytest.raises(Exception, match="oneDNN fp16"):
        check_config(config, 2)


def test_capped_onednn_is_refused_by_the_real_command(run_file: Path, repo_root: Path) -> None:
    """A real process whose oneDNN stops below AVX512-FP16, as on a Xeon without it."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "CUDA_VISIBLE_DEVICES": ""}
    check = ["config", "check", "--config", str(run_file), "--world-size", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "scaletrain", *check, "precision.dtype=fp16"],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout, done.stderr) == (2, "", REFUSAL)
