"""Train loop, two-stage schedule, optimizer/LR, checkpoints (torch_dist), resume, init_from."""

from msa_train.trainer.ckpt_layout import CheckpointError
from msa_train.trainer.schedule import RunPlan, StagePlan, build_plan

__all__ = ["CheckpointError", "RunPlan", "StagePlan", "build_plan", "run_training"]


def run_training(cfg) -> int:
    """Validate, initialize the runtime, train this job's stages; returns the process exit code."""
    from msa_train.trainer.entry import run_training as _run

    return _run(cfg)
