"""Hydra configuration: dataclass schemas (ConfigStore) and cross-field validation."""

from msa_train.config.schema import (CheckpointConfig, ParallelConfig, PhaseConfig, StageConfig,
                                     TrainConfig)
from msa_train.config.store import SCHEMA_NAME, MSATrainConfig, register_configs
from msa_train.config.validate import ConfigError, validate_config

CONFIG_DIR_NAME = "configs"

__all__ = [
    "CheckpointConfig", "ConfigError", "MSATrainConfig", "ParallelConfig", "PhaseConfig",
    "SCHEMA_NAME", "StageConfig", "TrainConfig", "register_configs", "validate_config",
    "CONFIG_DIR_NAME",
]
