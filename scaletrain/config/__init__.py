"""The run configuration: schema, loading, and the checks that run before any process starts."""

from scaletrain.config.checks import check_config
from scaletrain.config.load import dump_yaml, from_dict, load_config, to_dict
from scaletrain.config.schema import Config

__all__ = ["Config", "check_config", "dump_yaml", "from_dict", "load_config", "to_dict"]
