"""Train with a poisoned loss at chosen steps (a test-only fault hook, not a user setting).

    torchrun --nproc-per-node N tests/train/fault_run.py --poison nan --at 3,5 --config C ...

The loss of each chosen step is multiplied by inf or nan before backward, so every gradient of
that step is non-finite. Each step is poisoned once: after a rollback it trains normally.
"""

from __future__ import annotations

import argparse

from scaletrain.config import check_config, load_config
from scaletrain.logs import setup_logging
from scaletrain.topology.init import env_world_size, init_topology
from scaletrain.train.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--poison", choices=["inf", "nan"], required=True)
    parser.add_argument("--at", required=True, help="comma-separated steps (1-based)")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    setup_logging()
    config = load_config(args.config, args.overrides)
    resolved = check_config(config, env_world_size())
    topology = init_topology(resolved.dims)
    trainer = Trainer(config, topology, resolved)
    pending = {int(s) for s in args.at.split(",")}
    backward = trainer.engine.backward

    def poisoned_backward(loss, *a, **kw):
        step = trainer.step + 1
        if step in pending:
            loss = loss * float(args.poison)
            if trainer.engine.is_gradient_accumulation_boundary():
                pending.discard(step)
        return backward(loss, *a, **kw)

    trainer.engine.backward = poisoned_backward
    trainer.run()
    topology.destroy()


if __name__ == "__main__":
    main()
