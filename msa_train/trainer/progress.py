"""Progress counters of a run and the small JSON written beside every checkpoint."""

from __future__ import annotations

import datetime
import platform
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import torch


@dataclass
class Progress:
    iteration: int = 0  # optimizer steps completed (global, across stages)
    consumed_samples: int = 0  # global samples consumed: the data position
    stage: str = "warmup"

    def advance(self, samples: int) -> None:
        self.iteration += 1
        self.consumed_samples += samples

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Progress":
        return cls(iteration=int(data.get("iteration", 0)),
                   consumed_samples=int(data.get("consumed_samples", 0)),
                   stage=str(data.get("stage", "warmup")))


def _versions() -> Dict[str, str]:
    import megatron.core

    import msa_train

    return {"msa_train": msa_train.__version__, "megatron_core": megatron.core.__version__,
            "torch": torch.__version__, "python": platform.python_version()}


def state_json(cfg, plan, progress: Progress, wandb_run_ids: Dict[str, Optional[str]],
               init_report: Optional[Dict[str, Any]], world_size: int) -> Dict[str, Any]:
    stage = plan.stage_at(max(progress.iteration - 1, 0))
    seq = int(cfg.train.seq_length)
    return {
        "progress": progress.to_dict(),
        "stage": stage.name,
        "attention_mode": stage.mode,
        "stage_step": progress.iteration - stage.start_step,
        "stage_steps": stage.steps,
        "stage_complete": progress.iteration >= stage.end_step,
        "consumed_tokens": progress.consumed_samples * seq,
        # Data position: the resumable sampler restarts at this global sample index.
        "data": {"consumed_samples": progress.consumed_samples, "seq_length": seq,
                 "global_batch_size": int(cfg.train.global_batch_size)},
        # Per-rank RNG states are inside the checkpoint (rng_state); each stage reseeds from this.
        "rng": {"seed": int(cfg.train.seed), "stage_index": stage.index},
        "wandb_run_ids": dict(wandb_run_ids),
        "init_from": init_report,
        "world_size": world_size,
        "versions": _versions(),
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
