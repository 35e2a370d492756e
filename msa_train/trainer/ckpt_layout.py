"""On-disk layout of msa-train checkpoints (Megatron's, plus two small files per iteration).

    <save>/latest_checkpointed_iteration.txt      written LAST: a checkpoint exists once it names it
    <save>/iter_0000100/                          megatron.core.dist_checkpointing (torch_dist)
    <save>/iter_0000100/run_config.yaml           the resolved config of the run that wrote it
    <save>/iter_0000100/msa_train_state.json      stage, step, consumed tokens/samples, RNG seeds,
                                                   data position, wandb run id, versions
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
from typing import Any, Dict, Iterable, List, Optional

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
STATE_FILENAME = "msa_train_state.json"
RUN_CONFIG_FILENAME = "run_config.yaml"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(ValueError):
    """A checkpoint path or file is wrong; the message names the config field to change."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> Optional[int]:
    path = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as fh:
        text = fh.read(64).decode("utf-8", "replace").strip()
    if not text.isdigit():
        raise CheckpointError(f"{path} holds {text!r}, expected an iteration number: write the "
                              "number of the newest complete iter_XXXXXXX directory into it")
    return int(text)


def has_checkpoint(root: Optional[str]) -> bool:
    return bool(root) and os.path.isdir(root) and read_tracker(root) is not None


def resolve(path: str, field: str) -> str:
    """A save dir (its latest iteration) or an iter_XXXXXXX dir -> the iteration directory.

    A path that does not exist or holds no checkpoint is an error, never a silent random init.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"{field}={path} does not exist")
    if _ITER_RE.match(os.path.basename(os.path.normpath(path))) and os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "metadata.json")):
            raise CheckpointError(f"{field}={path} is not a torch_dist checkpoint (no metadata.json)")
        return path
    iteration = read_tracker(path)
    if iteration is None:
        raise CheckpointError(
            f"{field}={path} holds no checkpoint ({TRACKER_FILENAME} is missing); point it at a "
            "save directory with a finished checkpoint or at one of its iter_XXXXXXX directories"
        )
    directory = iteration_dir(path, iteration)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{field}: {path}/{TRACKER_FILENAME} names {directory}, which is missing")
    return directory


def save_dir_of_run(path: str, field: str) -> str:
    """A run dir (run_config.yaml, no checkpoint of its own) -> the save dir its config names;
    any other path is returned unchanged (resolve() then judges it)."""
    if not (os.path.isdir(path) and read_tracker(path) is None
            and os.path.isfile(os.path.join(path, RUN_CONFIG_FILENAME))
            and not os.path.isfile(os.path.join(path, "metadata.json"))):
        return path
    import yaml

    with open(os.path.join(path, RUN_CONFIG_FILENAME)) as fh:
        run_cfg = yaml.safe_load(fh) or {}
    save = (run_cfg.get("checkpoint") or {}).get("save")
    if not save:
        raise CheckpointError(f"{field}={path} is a run dir whose run_config.yaml has no "
                              "checkpoint.save: point it at a save dir or an iter_XXXXXXX dir")
    return save


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_tracker(root: str, iteration: int) -> None:
    write_atomic(os.path.join(root, TRACKER_FILENAME), f"{iteration}\n")


def write_state_json(directory: str, state: Dict[str, Any]) -> None:
    write_atomic(os.path.join(directory, STATE_FILENAME), json.dumps(state, indent=2, sort_keys=True) + "\n")


def read_state_json(directory: str) -> Optional[Dict[str, Any]]:
    """The msa-train state of a checkpoint; None for checkpoints written by other tools."""
    path = os.path.join(directory, STATE_FILENAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path} is damaged ({exc}); resume from an earlier iteration (README: When things "
            "go wrong) or restore the file from a copy") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is damaged (not a JSON object); restore it from a copy")
    return data


def list_iterations(root: str) -> List[int]:
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _ITER_RE.match(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found.append(int(match.group(1)))
    return sorted(found)


def prune(root: str, keep_last_k: Optional[int], protect: int,
          owned: Optional[Iterable[int]] = None) -> List[int]:
    """Delete iterations older than the newest keep_last_k, but only those in `owned`.

    `owned` are the iterations this job wrote or resumed through (its own lineage); anything
    else in the directory (another run's save, a newer iteration a concurrent writer is still
    saving) is never touched, nor is `protect` (the iteration the tracker now names).
    None = every iteration counts as owned.
    """
    if keep_last_k is None:
        return []
    iterations = [it for it in list_iterations(root) if it <= protect]
    candidates = iterations[: max(0, len(iterations) - keep_last_k)]
    allowed = None if owned is None else set(owned)
    doomed = [it for it in candidates
              if it != protect and (allowed is None or it in allowed)]
    for it in doomed:
        shutil.rmtree(iteration_dir(root, it), ignore_errors=True)
    return doomed


def _versions() -> Dict[str, str]:
    # Imported here: this module is read by tools that need neither torch nor Megatron.
    import megatron.core
    import torch

    import msa_train

    return {"msa_train": msa_train.__version__, "megatron_core": megatron.core.__version__,
            "torch": torch.__version__, "python": platform.python_version()}


def state_json(cfg, plan, progress, wandb_run_ids: Dict[str, Optional[str]],
               init_report: Optional[Dict[str, Any]], world_size: int) -> Dict[str, Any]:
    """The contents of STATE_FILENAME for a checkpoint at `progress`
    (msa_train.metrics.progress.Progress) of the run plan `plan`."""
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
