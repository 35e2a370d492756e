"""Save and load full training state with megatron.core.dist_checkpointing (torch_dist).

Full state = model chunks + distributed optimizer + LR scheduler + per-rank RNG + the trainer's
progress counters, plus a small `checkpoint_format` entry (optimizer format, parallel layout).
Model weights and the optimizer state are stored in model space, so a checkpoint resumes at any
TP / PP / CP / EP / DP layout (msa_train.trainer.optimizer_state); the per-rank RNG streams are
restored only at the saving layout. Checkpoints written before this format (optimizer as
`dp_reshardable`) still load, at their own layout. Weights-only loading (init_from) lives in
msa_train.trainer.init_from.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import sys
import time
from typing import Any, Dict, Iterable, List, Optional

import torch

from msa_train.trainer import ckpt_layout as layout
from msa_train.trainer import ckpt_manifest, optimizer_state, rng
from msa_train.trainer.ckpt_layout import CheckpointError

log = logging.getLogger(__name__)

# Megatron's default sharding type fails to save with plain torch Adam (no TE/apex); the
# fully_reshardable format saves, resumes exactly and reshards over every parallel dimension.
OPTIMIZER_METADATA = dict(optimizer_state.SAVE_METADATA)
FORMAT_KEY = "checkpoint_format"


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


def parallel_layout() -> Dict[str, Optional[int]]:
    """This job's parallel layout: RNG streams belong to a rank's place in it."""
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "vpp": ps.get_virtual_pipeline_model_parallel_world_size(),
            "cp": ps.get_context_parallel_world_size(),
            "ep": ps.get_expert_model_parallel_world_size(),
            "etp": ps.get_expert_tensor_parallel_world_size(),
            "world_size": torch.distributed.get_world_size()}


def _full_sharded_state_dict(chunks, optimizer, scheduler, progress: Dict[str, Any],
                             is_loading: bool, with_rng: bool,
                             optimizer_metadata: Dict[str, Any]) -> Dict[str, Any]:
    state = model_sharded_state_dict(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(
        state, is_loading=is_loading, metadata=optimizer_metadata
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
         state_json: Dict[str, Any], run_config_yaml: str, keep_last_k: Optional[int],
         owned: Optional[Iterable[int]] = None) -> str:
    """Write <root>/iter_XXXXXXX; the tracker file is updated only after every rank finished.

    Pruning (keep_last_k) removes only `owned` iterations (see ckpt_layout.prune)."""
    from megatron.core import dist_checkpointing

    directory = layout.iteration_dir(root, iteration)
    rank = torch.distributed.get_rank()
    if rank == 0:
        _clear_for_save(directory)
        os.makedirs(directory, exist_ok=True)
    _barrier()
    sharded = _full_sharded_state_dict(chunks, optimizer, scheduler, progress,
                                       is_loading=False, with_rng=True,
                                       optimizer_metadata=OPTIMIZER_METADATA)
    sharded[FORMAT_KEY] = {"optimizer": dict(OPTIMIZER_METADATA), "layout": parallel_layout()}
    dist_checkpointing.save(sharded, directory)
    _barrier()
    shards = ckpt_manifest.collect_shard_entries(directory)  # collective: each rank its own files
    if rank == 0:
        layout.write_atomic(os.path.join(directory, layout.RUN_CONFIG_FILENAME), run_config_yaml)
        layout.write_state_json(directory, state_json)
        ckpt_manifest.write_manifest(directory, shards)  # before the tracker names the iteration
        layout.write_tracker(root, iteration)
        removed = layout.prune(root, keep_last_k, protect=iteration,
                               owned=None if owned is None else set(owned) | {iteration})
        if removed:
            log.info("checkpoint: removed iterations %s (keep_last_k=%s)", removed, keep_last_k)
    _barrier()
    return directory


def _clear_for_save(directory: str) -> None:
    """Make room for a save of an iteration whose directory already exists.

    Without a manifest it is a save that died midway: remove it. With one it was complete, and
    this job went back past it (a damaged checkpoint it fell back from, or a divergence
    rollback): keep it aside as <iter>.replaced-<time> rather than destroy it.
    """
    if not os.path.isdir(directory):
        return
    if ckpt_manifest.read_manifest(directory) is None:
        shutil.rmtree(directory)
        return
    aside = f"{os.path.normpath(directory)}.replaced-{time.strftime('%Y%m%dT%H%M%S')}"
    os.replace(directory, aside)
    log.warning("checkpoint: kept the earlier %s as %s", directory, aside)


def _complete(directory: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, n))
               for n in ("metadata.json", layout.STATE_FILENAME))


def _loud(message: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        bar = "!" * 100
        print(f"{bar}\n{message}\n{bar}", file=sys.stderr, flush=True)


def select_intact(path: str, field: str, verify: bool = True) -> str:
    """Collective. The iteration to load from `path` (a save dir or an iter_XXXXXXX dir),
    checked against its manifest. A damaged latest iteration of a save dir falls back to the
    newest earlier intact one, loudly; nothing is deleted. Raises CheckpointError naming the
    damaged file(s) when nothing intact is left."""
    directory = layout.resolve(path, field)
    if not verify:
        return directory
    problems = ckpt_manifest.verify(directory)
    if problems is None:
        log.info("checkpoint: %s has no manifest (written by an older msa-train): not verified",
                 directory)
        return directory
    if not problems:
        return directory
    report = "\n    ".join(problems)
    explicit = os.path.normpath(directory) == os.path.normpath(path)
    if not explicit:
        latest = int(os.path.basename(os.path.normpath(directory))[len("iter_"):])
        for it in reversed(layout.list_iterations(path)):
            candidate = layout.iteration_dir(path, it)
            if it >= latest or not _complete(candidate):
                continue
            if ckpt_manifest.verify(candidate) == []:
                _loud(f"CHECKPOINT DAMAGED: {directory} fails verification:\n    {report}\n"
                      f"Resuming from the previous intact iteration {candidate} instead; the "
                      f"damaged iteration is left on disk (see README: When things go wrong).")
                return candidate
    raise CheckpointError(
        f"{field}: {directory} fails verification:\n    {report}\n  and "
        + ("no earlier intact iteration is left" if not explicit else "it was named explicitly")
        + ": restore the file(s) from a copy, point the field at another iteration, or set "
          "checkpoint.verify=false to load it anyway")


def _legacy_layout(directory: str) -> Optional[Dict[str, Any]]:
    """Parallel layout of a pre-format checkpoint, from the run_config.yaml saved beside it."""
    path = os.path.join(directory, layout.RUN_CONFIG_FILENAME)
    if not os.path.isfile(path):
        return None
    from omegaconf import OmegaConf

    parallel = OmegaConf.load(path).get("parallel")
    if parallel is None:
        return None
    return {k: (None if parallel.get(k) is None else int(parallel.get(k)))
            for k in ("tp", "pp", "vpp", "cp", "ep")}


def _check_legacy_layout(directory: str, current: Dict[str, Any]) -> None:
    saved = _legacy_layout(directory)
    if saved is None:
        return
    now = {k: current[k] for k in saved}
    if saved != now:
        raise CheckpointError(
            f"{directory} stores the optimizer in the old dp_reshardable format, which loads only "
            f"at the layout that wrote it ({saved}; this job: {now}): resume once with those "
            "parallel.* values and save (new checkpoints reshard), or use checkpoint.init_from "
            "for the weights only")


def _check_tensor_shapes(directory: str, model_state: Dict[str, Any]) -> None:
    """Megatron loads embeddings and the output layer even when their (padded) vocabulary size
    differs from the checkpoint's; the extra or missing padded logits then change the loss.
    A full resume must see the same shapes."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = dist_checkpointing.load_tensors_metadata(directory)
    wrong = sorted({f"{t.key}: checkpoint {tuple(saved[t.key].global_shape)}, this job "
                    f"{tuple(t.global_shape)}"
                    for t in nested_values(model_state)
                    if isinstance(t, ShardedTensor) and t.key in saved
                    and tuple(saved[t.key].global_shape) != tuple(t.global_shape)})
    if wrong:
        raise CheckpointError(
            f"{directory}: tensor shapes differ from this job's model: {wrong}. The padded "
            "vocabulary is a multiple of data.tokenizer.make_vocab_size_divisible_by x "
            "parallel.tp: when changing parallel.tp, scale make_vocab_size_divisible_by "
            "inversely so the product matches the saving run's; otherwise the model/ config "
            "differs from the checkpoint's")


def load(directory: str, chunks, optimizer, scheduler, saved_world_size: Optional[int]) -> Dict[str, Any]:
    """Load full training state from an iteration directory; returns the saved progress dict."""
    try:
        return _load(directory, chunks, optimizer, scheduler, saved_world_size)
    except CheckpointError:
        raise
    except _read_errors() as exc:
        # Damage the manifest could not catch (checkpoint.verify=false, or no manifest): a raw
        # EOFError / UnpicklingError from deep inside torch.load names no file and misleads.
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(
            f"{directory} could not be loaded ({type(exc).__name__}: {first}); the checkpoint is "
            "damaged or incomplete: resume from an earlier iteration (README: When things go "
            "wrong), or keep checkpoint.verify=true to have the damaged file named") from exc


# What reading damaged files raises from torch.load / torch.distributed.checkpoint / Megatron
# (EOFError, UnpicklingError, "PytorchStreamReader failed", CheckpointingException, ...);
# programming errors (NameError, TypeError, AttributeError) still surface as tracebacks.
def _read_errors() -> tuple:
    from megatron.core.dist_checkpointing.core import CheckpointingException

    return (EOFError, OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError,
            CheckpointingException)


def _load(directory: str, chunks, optimizer, scheduler, saved_world_size: Optional[int]):
    from megatron.core import dist_checkpointing

    current = parallel_layout()
    _check_tensor_shapes(directory, model_sharded_state_dict(chunks))
    fmt = dist_checkpointing.load_common_state_dict(directory).get(FORMAT_KEY)
    if fmt is not None:
        metadata = dict(fmt["optimizer"])
        saved_layout = fmt.get("layout") or {}
        with_rng = saved_layout == current
        why = f"it was written at {saved_layout}, this job runs at {current}"
    else:
        metadata = dict(optimizer_state.LEGACY_METADATA)
        _check_legacy_layout(directory, current)
        saved_layout = {}
        with_rng = saved_world_size == current["world_size"]
        why = f"it was written by {saved_world_size} ranks, this job has {current['world_size']}"
    distributed = optimizer_state.is_distributed(optimizer)
    if not distributed and saved_layout and saved_layout.get("ep") != current["ep"]:
        # Megatron's own loader pairs sub-optimizers by position; only the distributed
        # optimizer's state is remapped here.
        raise CheckpointError(
            f"{directory} was saved at parallel.ep={saved_layout.get('ep')}, this job has "
            f"parallel.ep={current['ep']}: changing EP needs "
            "parallel.use_distributed_optimizer=true")
    sharding = metadata.get("distrib_optim_sharding_type")
    reshardable = distributed and sharding == optimizer_state.SHARDING_TYPE
    if not with_rng:
        log.warning("RNG streams restart from the stage seed: %s", why)
    optimizer_state.init_states(optimizer)
    sharded = _full_sharded_state_dict(chunks, optimizer, scheduler, {}, is_loading=True,
                                       with_rng=with_rng, optimizer_metadata=metadata)
    fused_adam = optimizer_state.fused_adam_enabled(optimizer)  # loading replaces the groups
    with torch.no_grad():
        loaded = dist_checkpointing.load(sharded, directory)
        for i, chunk in enumerate(chunks):
            unwrap(chunk).load_state_dict(loaded[model_state_key(i, len(chunks))], strict=True)
        if reshardable:
            optimizer_state.load_reshardable(optimizer, loaded["optimizer"])
        else:
            optimizer.load_state_dict(loaded["optimizer"])
            _restore_adam_steps(optimizer, loaded["optimizer"])
        optimizer_state.set_fused_adam(optimizer, fused_adam)
    scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if with_rng:
        rng.restore(loaded["rng_state"])
    return dict(loaded["progress"])


def _restore_adam_steps(optimizer, loaded_state: Any) -> None:
    """Legacy / non-distributed optimizer: Adam's `step` from the loaded param groups (the dummy
    initialization leaves it at 1)."""
    subs = optimizer_state.sub_optimizers(optimizer)
    if len(subs) == 1:
        loaded = [loaded_state]
    elif isinstance(loaded_state, dict):
        loaded = [v for _, v in sorted(loaded_state.items())]
    else:
        loaded = list(loaded_state)
    for sub, sub_state in zip(subs, loaded, strict=False):
        inner = sub_state.get("optimizer", sub_state) if isinstance(sub_state, dict) else None
        groups = inner.get("param_groups") if isinstance(inner, dict) else None
        if groups:
            optimizer_state.restore_adam_steps(sub, groups)
