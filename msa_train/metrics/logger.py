"""MetricsLogger: the single place a step's metrics go (console, jsonl file, wandb).

    logger = MetricsLogger(cfg.logging, run_dir, run_id=None, is_logging_rank=is_last_pp_stage and dp_rank == 0
                           and tp_rank == 0 and cp_rank == 0, group=run_name, job_type=stage,
                           total_steps=train_steps, wandb_config=resolved_cfg_dict)
    logger.log(step, metrics)          # jsonl + wandb + one console line
    logger.wandb_run_id                # store in the checkpoint's JSON
    logger.close()

Only the logging rank (last pipeline stage: the one holding the loss) writes; on every other rank
the logger is a no-op, so callers need no rank checks. One logger per stage: at the warmup ->
sparse switch close it and create another with job_type="sparse" (same group, same run_dir); the
jsonl file is shared and each record carries its stage, which tools/plot_run.py uses to mark the
boundary.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Mapping, Optional, TextIO

from msa_train.metrics import keys
from msa_train.metrics.config import validate_logging_config
from msa_train.metrics.console import console_line
from msa_train.metrics.throughput import max_allocated_gib
from msa_train.metrics.jsonl import METRICS_FILENAME, JsonlWriter


class MetricsLogger:
    def __init__(self, cfg: Any, run_dir: str, run_id: Optional[str] = None,
                 is_logging_rank: bool = True, group: Optional[str] = None,
                 job_type: str = "train", *, total_steps: Optional[int] = None,
                 wandb_config: Optional[Mapping[str, Any]] = None, stream: TextIO = sys.stdout):
        validate_logging_config(cfg)
        self.cfg = cfg
        self.run_dir = run_dir
        self.job_type = job_type
        self.total_steps = total_steps
        self.active = bool(is_logging_rank)
        self._stream = stream
        self._jsonl: Optional[JsonlWriter] = None
        self._wandb = None
        self._wandb_run_id: Optional[str] = None
        if not self.active:
            return
        os.makedirs(run_dir, exist_ok=True)
        if getattr(cfg, "jsonl", True):
            self._jsonl = JsonlWriter(self.metrics_path)
        if getattr(cfg, "wandb", False) and getattr(cfg, "mode", "offline") != "disabled":
            from msa_train.metrics.wandb_run import WandbRun  # lazy: logging=none needs no wandb

            self._wandb = WandbRun(cfg, run_dir, group or os.path.basename(os.path.abspath(run_dir)),
                                   job_type, run_id=run_id, config=wandb_config)
            self._wandb_run_id = self._wandb.run_id

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.run_dir, METRICS_FILENAME)

    @property
    def wandb_run_id(self) -> Optional[str]:
        return self._wandb_run_id  # kept after close(): the final checkpoint's JSON records it

    # Both answer alike on every rank (logging or not): callers gate collectives on them.
    def should_log(self, step: int) -> bool:
        return step % self.cfg.log_interval == 0

    def should_sample_recall(self, step: int) -> bool:
        n = getattr(self.cfg, "recall_interval", 0)
        return n > 0 and step % n == 0

    def log(self, step: int, metrics: Mapping[str, Any], console: bool = True) -> None:
        """Record one step. None values are dropped (a metric that does not apply is absent).

        On CUDA, mem/max_allocated_gib (peak since the previous log call) is added when the
        caller did not supply it.
        """
        if not self.active:
            return
        clean = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items() if v is not None}
        if keys.MAX_ALLOCATED_GIB not in clean:
            mem = max_allocated_gib(reset=True)
            if mem is not None:
                clean[keys.MAX_ALLOCATED_GIB] = mem
        if self._jsonl is not None:
            self._jsonl.write(step, clean, stage=self.job_type)
        if self._wandb is not None:
            self._wandb.log(step, clean)
        if console and getattr(self.cfg, "console", True):
            print(console_line(step, self.total_steps, clean, stage=self.job_type),
                  file=self._stream, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
