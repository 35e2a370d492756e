"""Triton indexer KL entry points (the contract of msa_kernels' dispatch; see the package docstring).

Sparse stage, two algorithms over the same math (common.py), chosen per call by the selection's
query-tile overlap (``union.union_schedule_or_none``):
  union.py     union-tile Q-outer forward (eager dq_idx) + KV-outer dk_idx pass; the deterministic
               mode and selections whose neighbouring tokens share blocks.
  kv_outer.py  all-KV-outer passes with fp32 atomics; near-random selections, whose tile unions
               would multiply the work.
Warmup stage: dense.py (full causal support).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..layout import VarlenLayout
from ..triton_utils import last_dim_contiguous
from ..tuning import KLTuning, interpret_tiles, kl_tuning
from .dense import indexer_kl_dense_triton
from .kv_outer import KVOuterKL
from .union import UnionKL, union_schedule_or_none

__all__ = ["indexer_kl_triton", "indexer_kl_dense_triton"]


def indexer_kl_triton(q, k, lse, q_idx, k_idx, topk_idx, layout: VarlenLayout, *, block_size: int,
                      scale: float, index_scale: float, reduction: str = "mean",
                      deterministic: bool = False, tuning: Optional[KLTuning] = None) -> torch.Tensor:
    """Sparse-stage KL(P || Q) on the selected support -> fp32 scalar; grads to q_idx, k_idx only.
    ``tuning`` overrides the default tiles and path threshold (msa_kernels.tuning.kl_tuning)."""
    if block_size > 256:
        raise ValueError(f"block_size={block_size} exceeds the Triton KL tile (<= 256)")
    tuning = tuning or kl_tuning(interpret_tiles(q.device))
    q, k, q_idx, k_idx = last_dim_contiguous(q.detach(), k.detach(), q_idx, k_idx)
    lse = lse.detach().float()
    schedule = union_schedule_or_none(topk_idx, layout, block_size, deterministic, tuning)
    if schedule is None:
        return KVOuterKL.apply(q, k, lse, q_idx, k_idx, topk_idx, layout, block_size, float(scale),
                               float(index_scale), reduction, tuning)
    return UnionKL.apply(q, k, lse, q_idx, k_idx, layout, block_size, float(scale), float(index_scale),
                         reduction, bool(deterministic), schedule, tuning)
