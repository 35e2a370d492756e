"""Weights-only initialization from a checkpoint (checkpoint.init_from).

Two uses: the stage hand-off (stage 2 as its own job starts from stage 1's checkpoint) and the CPT
conversion, where the checkpoint is a DENSE GQA model without an index branch. Every weight the
checkpoint and the model share is loaded (shapes must match); parameters the checkpoint lacks are
allowed only if they belong to the MSA index branch, keep their fresh initialization and are
reported by name. Anything else that does not line up is an error naming the keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch

from msa_train.trainer.ckpt_layout import CheckpointError
from msa_train.trainer.checkpointing import model_state_key, unwrap

log = logging.getLogger(__name__)

# Checkpoint entries that are training state, not model weights.
_NON_MODEL_PREFIXES = ("optimizer.", "rng_state", "opt_param_scheduler", "progress")


@dataclass
class InitReport:
    directory: str
    loaded: List[str] = field(default_factory=list)  # checkpoint keys of the loaded weights
    added: List[str] = field(default_factory=list)  # keys of index-branch weights it lacked
    ignored: List[str] = field(default_factory=list)  # checkpoint index-branch keys the model lacks

    def summary(self) -> str:
        lines = [f"init_from {self.directory}: loaded {len(self.loaded)} tensors"]
        if self.added:
            lines.append(f"  added (freshly initialized, not in the checkpoint): {len(self.added)}")
            lines.extend(f"    + {name}" for name in self.added)
        if self.ignored:
            lines.append(f"  ignored (in the checkpoint, not in this model): {len(self.ignored)}")
            lines.extend(f"    - {name}" for name in self.ignored)
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, object]:
        return {"path": self.directory, "num_loaded": len(self.loaded), "added": self.added,
                "ignored": self.ignored}


def _checkpoint_tensor_shapes(directory: str) -> Dict[str, torch.Size]:
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(directory)
    return {key: tensor.global_shape for key, tensor in meta.items()
            if not key.startswith(_NON_MODEL_PREFIXES)}


def load_weights(directory: str, chunks, is_index_param: Callable[[str], bool],
                 field_name: str = "checkpoint.init_from") -> InitReport:
    """Load model weights only; the optimizer, scheduler and RNG stay fresh."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.validation import StrictHandling

    shapes = _checkpoint_tensor_shapes(directory)
    report = InitReport(directory=directory)
    model_keys = set()
    for i, chunk in enumerate(chunks):
        module = unwrap(chunk)
        sharded = module.sharded_state_dict()
        absent, wrong_shape = [], []
        keys_by_name: Dict[str, str] = {}
        for name, value in list(sharded.items()):
            key = getattr(value, "key", None)
            if key is None:
                continue
            model_keys.add(key)
            keys_by_name[name] = key
            if isinstance(value, ShardedObject):
                if name.endswith("_extra_state"):
                    # Extra state (TE/fp8 metadata) is not a weight; a dense checkpoint written
                    # without it must still load.
                    if key not in shapes:
                        del sharded[name]
                continue
            if key not in shapes:
                absent.append(name)
            elif isinstance(value, ShardedTensor) and tuple(value.global_shape) != tuple(shapes[key]):
                wrong_shape.append(f"{name}: checkpoint {tuple(shapes[key])} vs model "
                                   f"{tuple(value.global_shape)}")
        if wrong_shape:
            raise CheckpointError(
                f"{field_name}={directory}: tensor shapes differ from this model (model/ or "
                f"attention/ config differs from the checkpoint's): {wrong_shape}")
        not_index = [name for name in absent if not is_index_param(name)]
        if not_index:
            raise CheckpointError(
                f"{field_name}={directory} lacks weights this model needs: {not_index}; only "
                "MSA index-branch projections may be missing (dense -> MSA conversion)")
        for name in absent:
            del sharded[name]
        state_key = model_state_key(i, len(chunks))
        with torch.no_grad():
            # Wrapped under the key the trainer saves it with; the checkpoint's common (non-tensor)
            # entries come back beside it and are dropped.
            loaded = dist_checkpointing.load({state_key: sharded}, directory,
                                             strict=StrictHandling.ASSUME_OK_UNEXPECTED)
            result = module.load_state_dict(loaded[state_key], strict=False)
        unexpected_missing = [k for k in result.missing_keys
                              if k not in absent and not k.endswith("_extra_state")]
        if unexpected_missing or result.unexpected_keys:
            raise CheckpointError(
                f"{field_name}={directory}: state dict mismatch after loading "
                f"(missing {unexpected_missing}, unexpected {list(result.unexpected_keys)})")
        # Reported by checkpoint key: global layer numbers, unambiguous across pipeline stages.
        report.added.extend(keys_by_name[name] for name in absent)
        report.loaded.extend(keys_by_name[name] for name, value in sharded.items()
                             if name in keys_by_name and not isinstance(value, ShardedObject))
    extra = sorted(key for key in shapes if key not in model_keys)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # Under PP each rank sees only its own layers: a checkpoint key is foreign only if no rank
        # has it, and the report lists what every rank loaded and added (rank 0 prints it).
        gathered: List[tuple] = [() for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather_object(gathered, (model_keys, report.loaded, report.added))
        everywhere = set().union(*(g[0] for g in gathered))
        extra = sorted(key for key in shapes if key not in everywhere)
        report.loaded = sorted(set().union(*(g[1] for g in gathered)))
        report.added = sorted(set().union(*(g[2] for g in gathered)))
    foreign = [key for key in extra if not is_index_param(key)]
    if foreign:
        raise CheckpointError(
            f"{field_name}={directory} holds weights this model has no place for: {foreign}; "
            "check that model/ matches the checkpoint's model")
    report.ignored = extra
    return report
