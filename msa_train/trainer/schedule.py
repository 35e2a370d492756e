"""The two-stage MSA schedule: indexer warmup (dense attention + dense KL), then sparse training.

Stages are measured in tokens and executed in whole global batches. The plan is a pure function of
the config, so a continuous run, a resumed run and separate per-stage jobs agree on every step
number, stage boundary and the total number of samples the datasets must provide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

from msa_train.config.schema import STAGE_NAMES

# Attention mode of each stage (msa_train.model.set_msa_mode).
STAGE_MODES = {"warmup": "dense", "sparse": "sparse"}


@dataclass(frozen=True)
class StagePlan:
    name: str  # warmup | sparse
    index: int  # 0 for warmup, 1 for sparse: the same in every job layout (seeds derive from it)
    mode: str  # attention mode: dense | sparse
    trainable: str  # all | indexer_only
    tokens: int  # requested tokens
    start_step: int  # global optimizer steps completed before this stage starts
    steps: int  # optimizer steps of this stage
    lr: float
    min_lr: float
    lr_warmup_steps: int

    @property
    def end_step(self) -> int:
        return self.start_step + self.steps


@dataclass(frozen=True)
class RunPlan:
    tokens_per_step: int
    samples_per_step: int
    stages: List[StagePlan]  # every stage of the schedule, also those another job runs
    run: str  # both | warmup | sparse: which stages this job executes

    @property
    def total_steps(self) -> int:
        return self.stages[-1].end_step

    @property
    def total_samples(self) -> int:
        return self.total_steps * self.samples_per_step

    @property
    def job_stages(self) -> List[StagePlan]:
        return [s for s in self.stages if self.run in ("both", s.name)]

    @property
    def job_end_step(self) -> int:
        return self.job_stages[-1].end_step

    def stage_at(self, step: int) -> StagePlan:
        """The stage that runs optimizer step `step` (0-based count of completed steps)."""
        for stage in self.stages:
            if stage.start_step <= step < stage.end_step:
                return stage
        raise ValueError(f"step {step} is past the end of the schedule ({self.total_steps} steps)")

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.name == name)


def build_plan(stage_cfg, train_cfg) -> RunPlan:
    """Turn the stage/ and train/ config groups into the step-level schedule."""
    samples_per_step = int(train_cfg.global_batch_size)
    tokens_per_step = samples_per_step * int(train_cfg.seq_length)
    stages: List[StagePlan] = []
    start = 0
    for index, name in enumerate(STAGE_NAMES):
        phase = stage_cfg[name] if hasattr(stage_cfg, "__getitem__") else getattr(stage_cfg, name)
        steps = math.ceil(int(phase.tokens) / tokens_per_step)
        stages.append(
            StagePlan(
                name=name,
                index=index,
                mode=STAGE_MODES[name],
                trainable=str(phase.trainable),
                tokens=int(phase.tokens),
                start_step=start,
                steps=steps,
                lr=float(_pick(phase.lr, train_cfg.lr)),
                min_lr=float(_pick(phase.min_lr, train_cfg.min_lr)),
                lr_warmup_steps=int(_pick(phase.lr_warmup_steps, train_cfg.lr_warmup_steps)),
            )
        )
        start += steps
    return RunPlan(tokens_per_step, samples_per_step, stages, str(stage_cfg.run))


def _pick(value: Optional[float], default):
    return default if value is None else value
