"""Distributed-optimizer state in a layout-independent format, and loading it at any TP/PP/CP/EP.

On disk (`SAVE_METADATA`): Megatron's `fully_reshardable` format without the ChainedOptimizer's
`chained_<i>.` key prefix. Every optimizer tensor (fp32 main param, exp_avg, exp_avg_sq) is stored
per model parameter, in model space, under a key derived from the parameter's own checkpoint key,
so any TP/PP/CP/EP/DP layout finds it. The non-tensor part of each sub-optimizer (its param groups:
lr, weight decay, Adam `step`, ...) goes to the checkpoint's common state, written by rank 0.

Why loading is done here and not by `optimizer.load_state_dict`:
- Megatron builds a separate expert sub-optimizer only when EP > 1 (expert params are marked
  `allreduce=False` only then), so the number of sub-optimizers and the `is_expert_parallel` flag
  of the expert param groups depend on EP. The checkpoint's param groups are matched to this job's
  by their identity keys, with `is_expert_parallel` used only to prefer an exact match.
- Megatron 0.16.1's fully_reshardable loader copies every destination state key, torch Adam's
  `step` included, which that format does not store (`KeyError: 'step'`). The step is taken from
  the param groups and held aside while the tensors load.
Every Megatron function used here exists with the same signature in megatron-core 0.16.1 and
0.19.2 (checked against both wheels).

Cost: saving gathers each (TP, PP, EP) group's optimizer state into the host memory of every
data-parallel rank of that group (Megatron's default fully_reshardable exchange; its memory-efficient
variant gathers on DP rank 0 only but needs gloo process groups, which the trainer does not create).
Fine at the tested sizes; to be measured before the 109B recipe relies on it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch

from msa_train.trainer.ckpt_layout import CheckpointError

SHARDING_TYPE = "fully_reshardable"
SAVE_METADATA = {"distrib_optim_sharding_type": SHARDING_TYPE, "chained_optim_avoid_prefix": True}
# What msa-train wrote before: flat per-(TP, PP, EP) buffers that reload only at the saving layout.
LEGACY_SHARDING_TYPE = "dp_reshardable"
LEGACY_METADATA = {"distrib_optim_sharding_type": LEGACY_SHARDING_TYPE}

_EXPERT_KEY = "is_expert_parallel"


def sub_optimizers(optimizer) -> List[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = sub_optimizers(optimizer)
    return bool(subs) and all(isinstance(sub, DistributedOptimizer) for sub in subs)


def _torch_adams(optimizer):
    for sub in sub_optimizers(optimizer):
        inner = getattr(sub, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            yield inner


def fused_adam_enabled(optimizer) -> bool:
    """Whether set_fused_adam turned the fused kernel on (read it before a load overwrites the
    param groups with the checkpoint's)."""
    return any(group.get("fused") for inner in _torch_adams(optimizer) for group in inner.param_groups)


def set_fused_adam(optimizer, enabled: bool) -> None:
    """torch AdamW's fused step (one kernel over all tensors; train.fused_adam) instead of its
    foreach default, for param groups whose parameters are all on CUDA.

    Without TransformerEngine or Apex, Megatron-Core builds torch.optim.AdamW without `fused`;
    torch reads `fused` / `foreach` from the param group at every step, so setting them here (after
    building, and again after a checkpoint load has replaced the groups) switches the kernel. The
    fused kernel wants each parameter's `step` as an fp32 tensor on that parameter's device.
    """
    for inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            on = enabled and bool(group["params"]) and all(p.is_cuda for p in group["params"])
            group["fused"] = on
            if on:
                group["foreach"] = False
            for param in group["params"]:
                state = inner.state.get(param)
                if on and state and isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].to(device=param.device, dtype=torch.float32)


def init_states(optimizer) -> None:
    """Give a fresh optimizer real state tensors: loading copies into them in place."""
    for sub in sub_optimizers(optimizer):
        if hasattr(sub, "_init_optimizer_states_with_dummy_values"):
            sub._init_optimizer_states_with_dummy_values()
        elif getattr(sub, "init_state_fn", None) is not None:
            sub.init_state_fn(sub.optimizer, sub.config)


def _identity_keys() -> Tuple[str, ...]:
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    return tuple(param_group_identifier_keys)


def _identity(group: Dict[str, Any], keys: Sequence[str]) -> tuple:
    return tuple(group.get(key, group.get(f"pre_{key}")) for key in keys)


def match_param_groups(current: Sequence[Dict[str, Any]], saved: Sequence[Dict[str, Any]],
                       keys: Sequence[str]) -> List[Dict[str, Any]]:
    """For each of this job's param groups, the checkpoint's values (lr, weight decay, Adam step
    ...) relabeled with this group's identity, so Megatron's loader pairs them.

    A saved group with the same identity wins; otherwise one that differs only in
    `is_expert_parallel` (the same parameters under another EP size).
    """
    loose_keys = [key for key in keys if key != _EXPERT_KEY]
    out = []
    for group in current:
        exact = [s for s in saved if _identity(s, keys) == _identity(group, keys)]
        loose = [s for s in saved if _identity(s, loose_keys) == _identity(group, loose_keys)]
        found = (exact or loose or [None])[0]
        if found is None:
            want = dict(zip(keys, _identity(group, keys), strict=True))
            have = [dict(zip(keys, _identity(s, keys), strict=True)) for s in saved]
            raise CheckpointError(
                f"the checkpoint's optimizer has no param group for {want} (it has {have}): "
                "the trainable parameters or per-group optimizer settings differ from the run "
                "that wrote it (stage trainable policy, weight-decay or lr multipliers)")
        relabeled = {k: v for k, v in found.items() if k != "params"}
        relabeled.update({key: group[key] for key in keys if key in group})
        out.append(relabeled)
    return out


def _split_loaded(state: Dict[Any, Any], num_subs: int) -> Tuple[List[Dict], List[Dict]]:
    """Loaded optimizer entry -> (saved sub-optimizer common states, this job's per-sub param
    states). The common part keeps the saving job's structure (one sub-optimizer: its dict;
    several: a dict keyed 0..n-1); the tensors come back in this job's structure."""
    if "optimizer" in state:
        saved = [state]
    else:
        saved = [state[k] for k in sorted(k for k in state if isinstance(k, int))
                 if isinstance(state[k], dict) and "optimizer" in state[k]]
    if not saved:
        raise CheckpointError("the checkpoint holds no optimizer param groups (not written by "
                              "msa-train's trainer?): resume it with checkpoint.init_from instead")
    types = {s.get("param_state_sharding_type") for s in saved}
    if types != {SHARDING_TYPE}:
        raise CheckpointError(f"optimizer state is stored as {sorted(map(str, types))}, "
                              f"expected {SHARDING_TYPE}")
    if num_subs == 1:
        param_states = [state["param_state"]]
    else:
        param_states = [state[i]["param_state"] for i in range(num_subs)]
    return saved, param_states


def restore_adam_steps(sub, groups: Sequence[Dict[str, Any]]) -> None:
    """Set torch Adam's per-parameter `step` from the checkpoint's param groups (a fresh
    optimizer's dummy initialization leaves it at 1)."""
    for group, saved in zip(sub.optimizer.param_groups, groups, strict=True):
        if saved.get("step") is None:
            continue
        step = torch.tensor(float(saved["step"]), dtype=torch.float32)
        for param in group["params"]:
            state = sub.optimizer.state.get(param)
            if state is not None and "step" in state:
                state["step"] = step.clone()


@torch.no_grad()
def load_reshardable(optimizer, loaded: Dict[Any, Any]) -> None:
    """Load a SAVE_METADATA checkpoint entry (from dist_checkpointing.load of the state dict
    that `optimizer.sharded_state_dict(..., is_loading=True, metadata=SAVE_METADATA)` built)."""
    subs = sub_optimizers(optimizer)
    saved, param_states = _split_loaded(loaded, len(subs))
    keys = _identity_keys()
    pool = [group for common in saved for group in common["optimizer"]["param_groups"]]
    extra = {k: v for k, v in saved[0]["optimizer"].items() if k != "param_groups"}
    for sub, param_state in zip(subs, param_states, strict=True):
        groups = match_param_groups(sub.optimizer.param_groups, pool, keys)
        common: Dict[str, Any] = {"optimizer": {**extra, "param_groups": groups}}
        if saved[0].get("grad_scaler") is not None:
            common["grad_scaler"] = saved[0]["grad_scaler"]
        # Hyperparameters and Adam step (no 'param_state': the tensors load below).
        sub.load_state_dict(common)
        steps = {}
        for param, state in sub.optimizer.state.items():
            if "step" in state:
                steps[param] = state.pop("step")
        try:
            sub.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            for param, step in steps.items():
                sub.optimizer.state[param]["step"] = step
        restore_adam_steps(sub, groups)
