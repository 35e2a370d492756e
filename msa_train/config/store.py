"""The root config schema and its registration in Hydra's ConfigStore.

configs/config.yaml lists `msa_train_schema` first in its defaults, so every group file and every
command-line override is merged into these dataclasses: an unknown key or a value of the wrong type
fails at compose time, before any process group or model exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from hydra.core.config_store import ConfigStore

from msa_train.config.schema import CheckpointConfig, ParallelConfig, StageConfig, TrainConfig
from msa_train.data.config import DataConfig
from msa_train.lifecycle import ClusterConfig
from msa_train.metrics.config import LoggingConfig
from msa_train.model.config import AttentionConfig, ModelConfig

SCHEMA_NAME = "msa_train_schema"


@dataclass
class MSATrainConfig:
    # Run name: groups the stages of one run (wandb group) and names the default run directory.
    name: str = "tiny_cpu"
    # Directory for metrics, plots and the resolved config; checkpoints go to checkpoint.save.
    run_dir: str = "runs/${name}"
    # Print the layout / parameter / memory / FLOPs summary (msa_train.dry_run) and exit.
    dry_run: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Wall time, stop signals and launcher environment presets (configs/cluster).
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


_registered = False


def register_configs() -> None:
    """Register the root schema once per process (idempotent: tests compose many times)."""
    global _registered
    if _registered:
        return
    ConfigStore.instance().store(name=SCHEMA_NAME, node=MSATrainConfig)
    _registered = True
