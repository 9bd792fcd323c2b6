"""How long `scaletrain plan --search` takes at the largest world sizes it is meant for.

    .venv/bin/python benchmarks/plan_search.py

Searches every layout of Llama 3 405B and of moe-1t on 16,384 H100s (the same search as
`scaletrain plan --search`, in process, no DeepSpeed import) and prints the time of each
against the 5 s target (and the CPU time it used: a search is one thread, so on an idle
machine the two agree), with the candidates checked and kept.
"""

from __future__ import annotations

import time

from scaletrain.config.checks import check_config
from scaletrain.config.load import load_config
from scaletrain.plan.hardware import load_hardware
from scaletrain.plan.search import search

WORLD = 16384
TARGET_S = 5.0
RUN = "configs/runs/quickstart.yaml"
CASES = {  # the config's own layout and global batch; the search varies the layout
    "llama3-405b": [
        "parallel.tp=8",
        "parallel.pp=16",
        "parallel.pipeline_partition=parameters",
        "train.global_batch=2048",
    ],
    "moe-1t": [
        "parallel.tp=8",
        "parallel.ep=64",
        "train.global_batch=16384",
        "train.seq_len=4096",
    ],
}


def main() -> None:
    hardware = load_hardware("H100-SXM")
    for preset, layout in CASES.items():
        shape = ["train.micro_batch=1", "precision.dtype=bf16"]
        overrides = [f"model.base={preset}", "data.paths=[]", *layout, *shape]
        config = load_config(RUN, overrides)
        resolved = check_config(config, WORLD, check_data=False)
        start, cpu = time.perf_counter(), time.process_time()
        plans, checked, refused = search(config, resolved, WORLD, hardware)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        # CPU time too: on a shared machine the wall time measures the other jobs as well.
        print(
            f"{preset} on {WORLD:,} GPUs: {checked:,} layouts checked, {refused:,} refused, "
            f"{len(plans):,} fit; {seconds:.2f} s = {seconds / TARGET_S:.2f}x the {TARGET_S:.0f} s "
            f"target ({cpu:.2f} s of CPU)"
        )


if __name__ == "__main__":
    main()
