"""Train the tiny config with an fp16 overflow injected at one step (test-only fault hook).

    torchrun --nproc-per-node N tests/train/overflow_run.py --overflow-step K --config C ...

The loss of step K is multiplied by inf before backward, so every gradient overflows there;
DeepSpeed must skip that optimizer step on every rank and lower the loss scale.
"""

from __future__ import annotations

import argparse

from scaletrain.config import check_config, load_config
from scaletrain.logs import setup_logging
from scaletrain.topology.init import env_world_size, init_topology
from scaletrain.train.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--overflow-step", type=int, required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    setup_logging()
    config = load_config(args.config, args.overrides)
    resolved = check_config(config, env_world_size())
    topology = init_topology(resolved.dims)
    trainer = Trainer(config, topology, resolved)
    backward = trainer.engine.backward

    def overflowing_backward(loss, *a, **kw):
        if trainer.step + 1 == args.overflow_step:
            loss = loss * float("inf")
        return backward(loss, *a, **kw)

    trainer.engine.backward = overflowing_backward
    trainer.run()
    topology.destroy()


if __name__ == "__main__":
    main()
