"""Train with a fault injected at chosen steps (a test-only hook, not a user setting).

    torchrun --nproc-per-node N tests/train/fault_run.py --poison nan --at 3,5 --config C ...
    torchrun --nproc-per-node N tests/train/fault_run.py --poison hang --at 3 --config C ...

nan/inf: the loss of each chosen step is multiplied by it before backward, so every gradient of
that step is non-finite; each step is poisoned once (after a rollback it trains normally).
hang: the last rank sleeps before its backward of the chosen step, so the others wait for it
in a collective. slow-save: the save after the chosen step stalls 60 s after the shards are
written and before the checkpoint is made visible (a window to kill it in).
"""

from __future__ import annotations

import argparse
import time

from tests.trainer_script import trainer_from_argv


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--poison", choices=["inf", "nan", "hang", "slow-save"], required=True)
    parser.add_argument("--at", required=True, help="comma-separated steps (1-based)")
    args, trainer, topology = trainer_from_argv(parser)
    pending = {int(s) for s in args.at.split(",")}
    backward = trainer.engine.backward

    def poisoned_backward(loss, *a, **kw):
        step = trainer.step + 1
        if step in pending and args.poison == "hang":
            if topology.rank == topology.world_size - 1:
                time.sleep(3600)
        elif step in pending and args.poison in ("inf", "nan"):
            loss = loss * float(args.poison)
            if trainer.engine.is_gradient_accumulation_boundary():
                pending.discard(step)
        return backward(loss, *a, **kw)

    trainer.engine.backward = poisoned_backward
    describe = trainer.checkpoints._describe_files

    def slow_describe(folder, *rest):
        if args.poison == "slow-save" and trainer.step in pending:
            time.sleep(60)
        return describe(folder, *rest)

    trainer.checkpoints._describe_files = slow_describe
    trainer.run()
    topology.destroy()


if __name__ == "__main__":
    main()
