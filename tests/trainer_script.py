"""For test scripts run under torchrun: a Trainer from `--config C [overrides]` on argv."""

from __future__ import annotations

import argparse

from scaletrain.config import check_config, load_config
from scaletrain.logs import setup_logging
from scaletrain.topology.init import Topology, env_world_size, init_topology
from scaletrain.train.trainer import Trainer


def trainer_from_argv(
    parser: argparse.ArgumentParser,
) -> tuple[argparse.Namespace, Trainer, Topology]:
    """Parse the script's own flags plus `--config` and overrides; build the ranks' Trainer."""
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    setup_logging()
    config = load_config(args.config, args.overrides)
    resolved = check_config(config, env_world_size())
    topology = init_topology(resolved.dims)
    return args, Trainer(config, topology, resolved), topology
