"""Schema of the ``logging`` config group (configs/logging/*.yaml).

The trainer registers ``LoggingConfig`` in the ConfigStore under group "logging" so typos fail at
compose time; every consumer in msa_train.metrics accepts this dataclass or a DictConfig with the
same fields.
"""
from __future__ import annotations

import dataclasses
from typing import Any, List, Optional

WANDB_MODES = ("offline", "online", "disabled")


@dataclasses.dataclass
class LoggingConfig:
    # wandb: off with logging=none (then wandb need not be installed). The run is offline unless
    # mode or the WANDB_MODE environment variable (which wins, so operators can flip a job online
    # without touching its config) says otherwise.
    wandb: bool = True
    project: str = "msa-train"
    entity: Optional[str] = None
    mode: str = "offline"
    name: Optional[str] = None  # wandb display name prefix; default: the group
    tags: List[str] = dataclasses.field(default_factory=list)
    # Cadence (in optimizer steps).
    log_interval: int = 10
    recall_interval: int = 0  # msa/block_recall + msa/score_recall every N steps; 0 = never
    per_layer_kl: bool = False  # indexer_kl/layer_XX keys
    # Local sinks, always usable offline and without wandb.
    jsonl: bool = True
    console: bool = True
    plot_at_end: bool = True  # loss/KL PNG next to the metrics file when training ends
    # Dense bf16 peak TFLOP/s of one GPU for MFU; null = look the card up (unknown card -> no MFU).
    peak_tflops: Optional[float] = None


def validate_logging_config(cfg: Any) -> None:
    """Raise ValueError naming the logging.* field to change."""
    mode = getattr(cfg, "mode", "offline")
    if mode not in WANDB_MODES:
        raise ValueError(f"logging.mode must be one of {WANDB_MODES}, got {mode!r}")
    if getattr(cfg, "log_interval", 1) < 1:
        raise ValueError(f"logging.log_interval must be >= 1, got {cfg.log_interval}")
    if getattr(cfg, "recall_interval", 0) < 0:
        raise ValueError(f"logging.recall_interval must be >= 0 (0 = off), got {cfg.recall_interval}")
    peak = getattr(cfg, "peak_tflops", None)
    if peak is not None and peak <= 0:
        raise ValueError(f"logging.peak_tflops must be > 0 or null, got {peak}")
