"""Save and load full training state with megatron.core.dist_checkpointing (torch_dist).

Full state = model chunks + distributed optimizer (dp_reshardable) + LR scheduler + per-rank RNG +
the trainer's progress counters. Weights-only loading (init_from) lives in msa_train.trainer.init_from.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Dict, List, Optional

import torch

from msa_train.trainer import ckpt_layout as layout
from msa_train.trainer import rng

log = logging.getLogger(__name__)

# Plain torch Adam (no TE/apex) + DistributedOptimizer fails to save with Megatron's default
# sharding type; dp_reshardable saves and resumes exactly (reshards over DP only).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """DDP adds a 'module.' prefix to every key: checkpoints hold the bare model's keys."""
    return chunk.module if hasattr(chunk, "module") else chunk


def model_state_key(index: int, num_chunks: int) -> str:
    return "model" if num_chunks == 1 else f"model{index}"


def model_sharded_state_dict(chunks: List[torch.nn.Module]) -> Dict[str, Any]:
    return {
        model_state_key(i, len(chunks)): unwrap(chunk).sharded_state_dict()
        for i, chunk in enumerate(chunks)
    }


def _rng_sharded_object(state: Any):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    world = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _full_sharded_state_dict(chunks, optimizer, scheduler, progress: Dict[str, Any],
                             is_loading: bool, with_rng: bool) -> Dict[str, Any]:
    state = model_sharded_state_dict(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(
        state, is_loading=is_loading, metadata=OPTIMIZER_METADATA
    )
    state["opt_param_scheduler"] = scheduler.state_dict()
    state["progress"] = progress
    if with_rng:
        state["rng_state"] = _rng_sharded_object(rng.capture())
    return state


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save(root: str, iteration: int, chunks, optimizer, scheduler, progress: Dict[str, Any],
         state_json: Dict[str, Any], run_config_yaml: str, keep_last_k: Optional[int]) -> str:
    """Write <root>/iter_XXXXXXX; the tracker file is updated only after every rank finished."""
    from megatron.core import dist_checkpointing

    directory = layout.iteration_dir(root, iteration)
    rank = torch.distributed.get_rank()
    if rank == 0:
        # A directory for this iteration that the tracker does not name is a save that died
        # midway (or the tail of an abandoned run): replace it.
        if os.path.isdir(directory) and layout.read_tracker(root) != iteration:
            shutil.rmtree(directory)
        os.makedirs(directory, exist_ok=True)
    _barrier()
    sharded = _full_sharded_state_dict(chunks, optimizer, scheduler, progress,
                                       is_loading=False, with_rng=True)
    dist_checkpointing.save(sharded, directory)
    _barrier()
    if rank == 0:
        layout.write_atomic(os.path.join(directory, layout.RUN_CONFIG_FILENAME), run_config_yaml)
        layout.write_state_json(directory, state_json)
        layout.write_tracker(root, iteration)
        removed = layout.prune(root, keep_last_k, protect=iteration)
        if removed:
            log.info("checkpoint: removed iterations %s (keep_last_k=%s)", removed, keep_last_k)
    _barrier()
    return directory


def _init_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer real state tensors so the checkpoint can be loaded into them."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(sub, "_init_optimizer_states_with_dummy_values"):
            sub._init_optimizer_states_with_dummy_values()
        elif getattr(sub, "init_state_fn", None) is not None:
            sub.init_state_fn(sub.optimizer, sub.config)


def _restore_adam_steps(optimizer, loaded_state: Any) -> None:
    """The dummy initialization leaves Adam's `step` at 1; take it from the checkpoint."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(subs) == 1:
        loaded = [loaded_state]
    elif isinstance(loaded_state, dict):
        loaded = [v for _, v in sorted(loaded_state.items())]
    else:
        loaded = list(loaded_state)
    for sub, sub_state in zip(subs, loaded):
        inner = sub_state.get("optimizer", sub_state) if isinstance(sub_state, dict) else None
        groups = inner.get("param_groups") if isinstance(inner, dict) else None
        if not groups:
            continue
        for group, saved in zip(sub.optimizer.param_groups, groups):
            if "step" not in saved:
                continue
            step = torch.tensor(float(saved["step"]), dtype=torch.float32)
            for param in group["params"]:
                if param in sub.optimizer.state and "step" in sub.optimizer.state[param]:
                    sub.optimizer.state[param]["step"] = step.clone()


def load(directory: str, chunks, optimizer, scheduler, saved_world_size: Optional[int]) -> Dict[str, Any]:
    """Load full training state from an iteration directory; returns the saved progress dict."""
    from megatron.core import dist_checkpointing

    with_rng = saved_world_size == torch.distributed.get_world_size()
    if not with_rng:
        log.warning("checkpoint was written by %s ranks, this job has %s: RNG streams restart "
                    "from the stage seed", saved_world_size, torch.distributed.get_world_size())
    _init_optimizer_state(optimizer)
    sharded = _full_sharded_state_dict(chunks, optimizer, scheduler, {}, is_loading=True,
                                       with_rng=with_rng)
    with torch.no_grad():
        loaded = dist_checkpointing.load(sharded, directory)
        for i, chunk in enumerate(chunks):
            unwrap(chunk).load_state_dict(loaded[model_state_key(i, len(chunks))], strict=True)
        optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer, loaded["optimizer"])
    scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if with_rng:
        rng.restore(loaded["rng_state"])
    return dict(loaded["progress"])
