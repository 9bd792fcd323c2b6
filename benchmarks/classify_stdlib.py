"""Does fine-tuning a pretrained model classify better than chance and than training from scratch?

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/classify_stdlib.py [--nproc 2]
        [--steps 150] [--pretrain-steps 400] [--work runs/classify-bench] [section.field=value ...]

The task: which standard-library package (asyncio, email, json, multiprocessing, unittest,
xml) a 480-character chunk of source comes from (`scaletrain.data.classify_sample`). The
script prepares `data/stdlib` as the quickstart does (unless it is there), pretrains the
quickstart model (`configs/runs/quickstart.yaml`, `--pretrain-steps`; a finished
runs/quickstart is reused), exports it with `scaletrain export hf`, then trains
`configs/runs/classify-stdlib.yaml` twice for `--steps` steps: from that export
(`model.init_from`) and from scratch (same seed, same head initialisation). Last it prints

    majority baseline A, from scratch B, fine-tuned C (val accuracy, N examples, K steps)

with the validation accuracy of both runs at their last step and the share of the most common
training label in the validation split. Trailing overrides apply to both classification runs
(e.g. optim.lr=2e-3). The test (tests/benchmarks/test_classify_stdlib.py)
runs a short version on the tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "configs" / "runs" / "quickstart.yaml"
CLASSIFY = REPO / "configs" / "runs" / "classify-stdlib.yaml"


@dataclass(frozen=True)
class Result:
    majority: float
    scratch: float | None
    finetuned: float
    examples: int
    steps: int

    def line(self) -> str:
        scratch = "not run" if self.scratch is None else f"{self.scratch:.3f}"
        return (
            f"majority baseline {self.majority:.3f}, from scratch {scratch}, "
            f"fine-tuned {self.finetuned:.3f} (val accuracy, {self.examples} examples, "
            f"{self.steps} steps)"
        )


def _env() -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def _run(*args: str) -> None:
    done = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise SystemExit(f"{' '.join(args[:6])} ... failed ({done.returncode}):\n{tail}")


def scaletrain(*args: str) -> None:
    _run(sys.executable, "-m", "scaletrain", *args)


def train(nproc: int, config: Path, *overrides: str) -> list[dict]:
    """`scaletrain train` on `nproc` CPU ranks; returns its metrics.jsonl records."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    _run(*run, f"--nproc-per-node={nproc}", "-m", "scaletrain", "train", "--config", str(config),
         *overrides)  # fmt: skip
    run_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("train.run_dir="))
    lines = (REPO / run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def majority_accuracy(data: Path) -> tuple[float, int]:
    """Accuracy on the val split of always answering the most common training label."""
    from scaletrain.data.format import read_metadata

    info = read_metadata(data)
    train_labels = np.load(data / info.splits["train"].label_file)
    val_labels = np.load(data / info.splits["val"].label_file)
    majority = np.bincount(train_labels).argmax()
    return float((val_labels == majority).mean()), len(val_labels)


def run_benchmark(
    work: Path,
    stdlib: Path,
    pretrained_run: Path,
    nproc: int,
    steps: int,
    pretrain: tuple[str, ...],
    classify: tuple[str, ...] = (),
    max_length: int = 128,
    scratch: bool = True,
) -> Result:
    """Pretrain (unless `pretrained_run` holds a finished checkpoint), export, fine-tune and
    (with `scratch`) train from scratch. `pretrain` / `classify` override the run configs."""
    work.mkdir(parents=True, exist_ok=True)
    if not (pretrained_run / "checkpoints" / "latest").is_file():
        train(nproc, QUICKSTART, f"data.paths=[{stdlib}]", f"train.run_dir={pretrained_run}",
              *pretrain)  # fmt: skip
    hf = work / "pretrained-hf"
    scaletrain("export", "hf", str(pretrained_run), str(hf), "--force")
    from scaletrain.data.classify_sample import write_sample

    write_sample(work / "chunks.csv")
    data = work / "data"
    scaletrain("data", "prepare", "--format", "classify", "--input", str(work / "chunks.csv"),
               "--output", str(data), "--tokenizer", str(stdlib / "tokenizer"),
               "--label-field", "package", "--max-length", str(max_length))  # fmt: skip
    common = (f"data.paths=[{data}]", f"train.steps={steps}", f"train.eval_interval={steps}",
              *classify)  # fmt: skip
    scratch_run = (
        train(nproc, CLASSIFY, *common, f"train.run_dir={work / 'scratch'}") if scratch else []
    )
    tuned = train(nproc, CLASSIFY, *common, f"train.run_dir={work / 'finetuned'}",
                  f"model.init_from=hf:{hf}")  # fmt: skip
    majority, examples = majority_accuracy(data)
    return Result(
        majority,
        _final_accuracy(scratch_run) if scratch else None,
        _final_accuracy(tuned),
        examples,
        steps,
    )


def _final_accuracy(metrics: list[dict]) -> float:
    return [m for m in metrics if "val_accuracy" in m][-1]["val_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "classify-bench")
    parser.add_argument("overrides", nargs="*", help="section.field=value for both classify runs")
    args = parser.parse_args()
    stdlib = REPO / "data" / "stdlib"
    if not (stdlib / "metadata.json").is_file():
        scaletrain("data", "prepare", "--stdlib", "--output", str(stdlib), "--vocab-size", "4096")
    result = run_benchmark(
        args.work,
        stdlib,
        REPO / "runs" / "quickstart",
        args.nproc,
        args.steps,
        (f"train.steps={args.pretrain_steps}",),
        tuple(args.overrides),
    )
    print(result.line())


if __name__ == "__main__":
    main()
