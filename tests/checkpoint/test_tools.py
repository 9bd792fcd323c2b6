"""`scaletrain ckpt list / verify / consolidate`.

List and verify run on hand-made checkpoints (real manifests over small files), so every way a
checkpoint can be damaged is checked in milliseconds. Consolidation runs on real checkpoints:
a torchrun script trains two steps, saves, and writes the live model's full weights; the
consolidated file must hold exactly those weights (torch.equal) under the model's names.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu
from safetensors.torch import load_file

from scaletrain.checkpoint.consolidate import merge_tp_slices, split_tp
from scaletrain.checkpoint.manifest import Manifest, describe_file, tag_for
from scaletrain.cli import main
from tests.distributed import REPO, TINY, run_cli, torchrun

SAVED_AT = "2026-01-02T03:04:05+0000"
FILES = {  # path -> size: 9.5 kB per checkpoint
    "mp_rank_00_model_states.pt": 3000,
    "zero_pp_rank_0_mp_rank_00_optim_states.pt": 3000,
    "zero_pp_rank_1_mp_rank_00_optim_states.pt": 3000,
    "rng/rank_00000.pt": 250,
    "rng/rank_00001.pt": 250,
}


def fake_checkpoint(root: Path, step: int, staging: bool = False) -> Path:
    """A checkpoint folder as CheckpointManager.save leaves it, over random bytes."""
    folder = root / (".staging" if staging else "") / tag_for(step)
    generator = torch.Generator().manual_seed(step)
    for relative, size in FILES.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(torch.randint(0, 256, (size,), generator=generator).tolist()))
    if staging:
        return folder
    data = {
        "format_version": 1,
        "step": step,
        "layout": {"tp": 1, "pp": 1, "dp": 2, "ep": 1, "zero_stage": 1, "world_size": 2},
        "precision": "bf16",
        "saved_at": SAVED_AT,
        "files": [describe_file(folder, relative) for relative in sorted(FILES)],
    }
    Manifest(folder, data).write()
    (root / "latest").write_text(tag_for(step) + "\n")
    return folder


def ckpt(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, list[str], list[str]]:
    """Run `scaletrain ckpt ...` in this process: (exit code, stdout lines, stderr lines)."""
    code = main(["ckpt", *args])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def header(tag_width: int) -> str:
    columns = f"STEP    SIZE  FILES  {'LAYOUT':<20}  {'SAVED_AT':<24}  STATUS"
    return f"{'':1}  {'TAG':<{tag_width}}  {columns}"


def row(tag_width: int, mark: str, tag: str, step: int, status: str, hidden: bool = False) -> str:
    """One line of the table for a fake checkpoint (9.5 kB in 5 files)."""
    layout, saved_at = ("-", "-") if hidden else ("tp1pp1dp2 zero1 bf16", SAVED_AT)
    return (
        f"{mark:1}  {tag:<{tag_width}}  {step:>4}  9.5 kB      5  {layout:<20}  {saved_at:<24}  "
        f"{status}"
    )


def test_list_shows_complete_corrupt_and_unfinished_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "run" / "checkpoints"
    for step in (2, 4, 6):
        fake_checkpoint(root, step)
    code, lines, _ = ckpt(capsys, "list", str(tmp_path / "run"))
    assert code == 0
    assert lines == [
        header(13),
        row(13, "", "step_00000002", 2, "complete"),
        row(13, "", "step_00000004", 4, "complete"),
        row(13, "*", "step_00000006", 6, "complete"),
        "latest: step_00000006",
    ]

    truncated = root / "step_00000004" / "mp_rank_00_model_states.pt"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    flipped = root / "step_00000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    fake_checkpoint(root, 8, staging=True)  # a save killed before its rename

    code, lines, _ = ckpt(capsys, "list", str(root))  # the checkpoints folder works too
    assert code == 1
    truncated_status = (
        "corrupt: mp_rank_00_model_states.pt has 1000 bytes, manifest says 3000 (truncated?)"
    )
    flipped_status = (
        "corrupt: zero_pp_rank_1_mp_rank_00_optim_states.pt fails its checksum (corrupted)"
    )
    # The truncated checkpoint is 2 kB smaller on disk, but the table shows the manifest's size.
    assert lines == [
        header(22),
        row(22, "", "step_00000002", 2, "complete"),
        row(22, "", "step_00000004", 4, truncated_status),
        row(22, "*", "step_00000006", 6, flipped_status),
        row(22, "", ".staging/step_00000008", 8, "incomplete (not visible)", hidden=True),
        "latest: step_00000006",
    ]


def test_list_of_an_empty_run_and_of_a_missing_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "checkpoints").mkdir()
    assert ckpt(capsys, "list", str(tmp_path)) == (
        0,
        [f"no checkpoints in {tmp_path / 'checkpoints'}"],
        [],
    )
    code, out, err = ckpt(capsys, "list", str(tmp_path / "nope"))
    assert (code, out, err) == (2, [], [f"{tmp_path / 'nope'}: no such folder"])


def test_verify_names_the_first_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = fake_checkpoint(tmp_path / "checkpoints", 12)
    assert ckpt(capsys, "verify", str(folder)) == (
        0,
        [f"ok: {folder} step 12, 5 files, 0.0 MB"],
        [],
    )

    flipped = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(flipped.read_bytes())
    data[7] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated = folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    truncated.write_bytes(truncated.read_bytes()[:-1])
    assert ckpt(capsys, "verify", str(folder)) == (
        1,
        [],
        [
            f"corrupt: {folder}: zero_pp_rank_0_mp_rank_00_optim_states.pt fails its checksum "
            "(corrupted)"
        ],
    )
    flipped.unlink()
    assert ckpt(capsys, "verify", str(folder)) == (
        1,
        [],
        [f"corrupt: {folder}: zero_pp_rank_0_mp_rank_00_optim_states.pt is missing"],
    )
    (folder / "manifest.json").unlink()
    assert ckpt(capsys, "verify", str(folder)) == (
        1,
        [],
        [f"corrupt: {folder}: manifest.json is missing or unreadable"],
    )
    assert ckpt(capsys, "verify", str(tmp_path)) == (  # a run folder, not a checkpoint
        2,
        [],
        [f"{tmp_path} is not a checkpoint folder; give one step_* folder (see `ckpt list`)"],
    )


def test_consolidate_refuses_to_clobber_or_to_write_into_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Checked before anything is read: a `latest` pointer overwritten by safetensors bytes
    broke `ckpt list` and resume; an unrelated file was silently replaced."""
    root = tmp_path / "run" / "checkpoints"
    folder = fake_checkpoint(root, 4)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    other_run = fake_checkpoint(tmp_path / "other" / "checkpoints", 2)
    inside = [
        (root / "latest", root),
        (root / "model.safetensors", root),
        (folder / "model.safetensors", folder),
        (other_run / "rng" / "model.safetensors", other_run),
        (root / ".staging" / "new" / "model.safetensors", root),
    ]
    for out, holder in inside:
        code, lines, errors = ckpt(capsys, "consolidate", str(folder), str(out), "--force")
        assert (code, lines) == (2, [])
        assert errors == [
            f"{out} is inside the checkpoint folder {holder}; write the consolidated file "
            "somewhere else"
        ]
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert not (root / ".staging").exists()

    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("keep me")
    code, _, errors = ckpt(capsys, "consolidate", str(folder), str(unrelated))
    assert (code, errors) == (2, [f"{unrelated} exists; pass --force to replace it"])
    assert unrelated.read_text() == "keep me"
    existing = tmp_path / "out" / "model.safetensors"  # a folder as OUT: the default name in it
    existing.parent.mkdir()
    existing.write_text("keep me too")
    code, _, errors = ckpt(capsys, "consolidate", str(folder), str(existing.parent))
    assert (code, errors) == (2, [f"{existing} exists; pass --force to replace it"])
    assert existing.read_text() == "keep me too"


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dim", [0, 1])
def test_merge_inverts_megatron_core_split(tp: int, stride: int, dim: int) -> None:
    """megatron-core's own CPU initialisation splits; merging its slices gives its master."""
    out_features, in_features = 8 * tp * stride, 4 * tp * stride
    full_size = out_features if dim == 0 else in_features
    slices, master = [], None
    for rank in range(tp):
        shape = [out_features, in_features]
        shape[dim] = full_size // tp
        weight = torch.empty(shape)
        torch.manual_seed(0)
        master = _initialize_affine_weight_cpu(
            weight,
            out_features,
            in_features,
            full_size // tp,
            dim,
            torch.nn.init.normal_,
            stride=stride,
            return_master_weight=True,
            rank=rank,
            world_size=tp,
        )
        slices.append(weight)
        assert torch.equal(split_tp(master, tp, rank, dim, stride), weight)
    merged = merge_tp_slices(slices, dim, stride)
    assert merged.is_contiguous() and merged.dtype == torch.float32
    assert torch.equal(merged, master)


# ---- consolidation of real checkpoints ----------------------------------------------------
# Between them: zero_to_fp32's stage-1/2 path with DP partitions, its stage-3 path with DP
# partitions and TP slices, our own ZeRO-0 path (fp32 masters of DeepSpeed's bf16 optimizer),
# and the stride-2 merge of the fused gate|up projection (every TP2 layout).
LAYOUTS = {
    "dp2-zero1": (2, ("parallel.zero_stage=1",)),
    "tp2dp2-zero3": (4, ("parallel.tp=2", "parallel.zero_stage=3")),
    "tp2-zero0-bf16": (2, ("parallel.tp=2", "parallel.zero_stage=0", "precision.dtype=bf16")),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_consolidated_weights_equal_the_live_model(
    layout: str, stdlib_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    nproc, overrides = LAYOUTS[layout]
    run_dir, live_file = tmp_path / "run", tmp_path / "live.safetensors"
    torchrun(
        nproc,
        str(REPO / "tests" / "checkpoint" / "live_weights_run.py"),
        f"--out={live_file}",
        "--config",
        str(TINY),
        f"data.paths=[{stdlib_data}]",
        f"train.run_dir={run_dir}",
        *overrides,
    )
    folder = run_dir / "checkpoints" / "step_00000002"
    out = tmp_path / "consolidated" / "model.safetensors"
    done = run_cli("ckpt", "consolidate", str(folder), str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"wrote {out}: 15 tensors, ")
    assert done.stdout.rstrip().endswith(", step 2")

    live, merged = load_file(live_file), load_file(out)
    manifest = Manifest.read(folder)
    assert manifest is not None
    assert sorted(merged) == sorted(live) == sorted(manifest.data["parameters"])
    for name, want in live.items():
        got = merged[name]
        assert got.dtype == torch.float32 and got.is_contiguous(), name
        assert got.shape == want.shape, name
        assert torch.equal(got.to(want.dtype), want), name
    if "bf16" in layout:  # the fp32 master weights, not the bf16 copies widened
        assert any(not torch.equal(t, t.bfloat16().float()) for t in merged.values())

    code, lines, _ = ckpt(capsys, "list", str(run_dir))
    assert code == 0
    assert [line.split()[-1] for line in lines[1:3]] == ["complete", "complete"]
    assert lines[2].startswith("*  step_00000002") and lines[-1] == "latest: step_00000002"
    code, lines, _ = ckpt(capsys, "verify", str(folder))
    assert code == 0 and lines[0].startswith(f"ok: {folder} step 2, ")
