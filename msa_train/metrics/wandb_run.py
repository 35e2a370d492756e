"""wandb run handling: lazy import, offline by default, one persisted run id per stage.

A two-stage training (indexer warmup, then sparse) is one wandb *group*; each stage is its own run
whose *job_type* is the stage. The run id of each stage is stored in ``<run_dir>/wandb_run_ids.json``
so a requeued / resumed job continues the same run (``resume="allow"``); offline runs of the same
id are merged by ``wandb sync``.

Metrics are plotted against our own ``global_step`` axis instead of wandb's internal step: a
resumed job re-logs the steps done after the last checkpoint, which wandb's monotonic step would
silently drop.
"""
from __future__ import annotations

import json
import os
import secrets
import string
from typing import Any, Mapping, Optional

RUN_IDS_FILENAME = "wandb_run_ids.json"
STEP_METRIC = "global_step"


def _import_wandb():
    try:
        import wandb
    except ImportError as e:
        raise ImportError(
            "logging.wandb=true needs the wandb package (pip install wandb); "
            "use logging=none to train without it") from e
    return wandb


def new_run_id() -> str:
    """wandb-style id: 8 lowercase alphanumerics (unique enough per project, URL-safe)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def load_run_id(run_dir: str, job_type: str) -> Optional[str]:
    path = os.path.join(run_dir, RUN_IDS_FILENAME)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get(job_type)


def save_run_id(run_dir: str, job_type: str, run_id: str) -> None:
    path = os.path.join(run_dir, RUN_IDS_FILENAME)
    ids = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            ids = json.load(f)
    if ids.get(job_type) == run_id:
        return
    ids[job_type] = run_id
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(ids, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written id file


class WandbRun:
    """One wandb run of one stage. Create only on the logging rank."""

    def __init__(self, cfg: Any, run_dir: str, group: str, job_type: str,
                 run_id: Optional[str] = None, config: Optional[Mapping[str, Any]] = None):
        wandb = _import_wandb()
        os.makedirs(run_dir, exist_ok=True)
        self.run_id = run_id or load_run_id(run_dir, job_type) or new_run_id()
        save_run_id(run_dir, job_type, self.run_id)
        mode = os.environ.get("WANDB_MODE") or getattr(cfg, "mode", "offline")
        name = f"{getattr(cfg, 'name', None) or group}-{job_type}"
        self._run = wandb.init(
            id=self.run_id,
            resume="allow",
            dir=run_dir,
            project=getattr(cfg, "project", "msa-train"),
            entity=getattr(cfg, "entity", None),
            group=group,
            job_type=job_type,
            name=name,
            mode=mode,
            tags=list(getattr(cfg, "tags", []) or []),
            config=dict(config) if config is not None else None,
        )
        self._run.define_metric(STEP_METRIC)
        self._run.define_metric("*", step_metric=STEP_METRIC)

    @property
    def dir(self) -> str:
        return self._run.dir

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log({STEP_METRIC: int(step), **metrics})

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
