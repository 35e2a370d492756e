"""Hydra configuration: dataclass schemas (ConfigStore) and cross-field validation."""

import os

from msa_train.config.schema import (CheckpointConfig, ParallelConfig, PhaseConfig, StageConfig,
                                     TrainConfig)
from msa_train.config.store import SCHEMA_NAME, MSATrainConfig, register_configs
from msa_train.config.validate import ConfigError, validate_config

CONFIG_DIR_NAME = "configs"
# The config groups of this checkout (configs/ beside the msa_train package): the `msa-train` entry
# point and every programmatic composition (dry run, tools) read the same directory.
CONFIG_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           CONFIG_DIR_NAME)

__all__ = [
    "CheckpointConfig", "ConfigError", "MSATrainConfig", "ParallelConfig", "PhaseConfig",
    "SCHEMA_NAME", "StageConfig", "TrainConfig", "register_configs", "validate_config",
    "CONFIG_DIR_NAME", "CONFIG_PATH",
]
