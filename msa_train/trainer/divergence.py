"""Divergence policy: skip non-finite updates, stop (or roll back) after too many in a row.

A step whose global gradient norm is NaN/inf is not applied (parameters, optimizer moments and
the LR schedule stay as they were); the data position still moves on, so the next step sees
new batches. The decision needs the gradient norm on the host, which Megatron's clipping
computes on the host every step anyway, so it adds no synchronization; a non-finite *loss*
with finite gradients is accumulated in a device flag and reported at the next logging step.

After `train.max_skipped_steps` skipped steps in a row the job stops with DIVERGED_EXIT_CODE
without saving (the last checkpoint holds the last good state), or, with
`train.rollback_on_divergence`, reloads the last checkpoint and continues from the current data
position (the batches since that checkpoint are skipped), at most `train.max_rollbacks` times.
"""

from __future__ import annotations

import math
from typing import Optional

# Distinct from 1 (crash), 2 (bad input), 4 (run locked), 75 (requeue): a launcher must not
# requeue this job blindly, its state would diverge again.
DIVERGED_EXIT_CODE = 3


class DivergenceError(RuntimeError):
    """Training diverged past the policy's limits; nothing was saved."""


def is_finite(value: Optional[float]) -> bool:
    return value is None or math.isfinite(value)


class DivergencePolicy:
    def __init__(self, max_skipped_steps: int, rollback: bool, max_rollbacks: int):
        self.max_skipped_steps = int(max_skipped_steps)
        self.rollback = bool(rollback)
        self.max_rollbacks = int(max_rollbacks)
        self.in_a_row = 0
        self.total_skipped = 0
        self.rollbacks = 0

    @classmethod
    def from_config(cls, train_cfg) -> "DivergencePolicy":
        return cls(int(train_cfg.get("max_skipped_steps", 10)),
                   bool(train_cfg.get("rollback_on_divergence", False)),
                   int(train_cfg.get("max_rollbacks", 3)))

    def record(self, skipped: bool) -> str:
        """'ok', 'rollback' or 'stop' after one optimizer step."""
        if not skipped:
            self.in_a_row = 0
            return "ok"
        self.in_a_row += 1
        self.total_skipped += 1
        if self.in_a_row < self.max_skipped_steps:
            return "ok"
        if self.rollback and self.rollbacks < self.max_rollbacks:
            return "rollback"
        return "stop"

    def rolled_back(self) -> None:
        self.rollbacks += 1
        self.in_a_row = 0
