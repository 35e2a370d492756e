"""Sparse attention + sparse-stage indexer KL in one autograd node (Triton).

Unfused, the KL runs its own passes that recompute every head's probability of every selected
(query, key) pair: the teacher, once in its forward (value, student LSE, eager dq_idx) and once in
its key-gradient pass. The sparse-attention backward computes exactly these probabilities in both of
its passes, so the fused node moves KL work there (msa_kernels.attention.triton_bwd, items 5 and 6):

* key gradient -> the KV-outer pass (groups of at most FUSE_MAX_GROUP heads: its rows are (token,
  head), so the student logits and key gradient run once per HEAD row, G-fold redundant; measured
  on H200 at 32K (kernels/BENCHMARKS_index.md, item 11): 1.09x at G = 4, 0.96x at G = 8). Larger
  groups keep the separate KL key pass.
* deferred KL (``defer_kl=True``): the forward runs only a student pass (student LSE and
  sum_j Q_j k_idx_j; no teacher), and the Q-outer dQ pass of the backward computes the KL value and
  dq_idx from its exact probabilities. The returned KL scalar holds NaN until the backward has run
  and then the value (written in place): for training loops that read the KL after backward (the
  model's KL tracker). Any group size.
* otherwise the KL forward (student LSE, teacher mass, KL value and dq_idx, eagerly, over union
  tiles) runs as in msa_kernels.kl.triton._sparse_forward.

Fusion needs the union-tile schedule: selections whose tile unions blow up (near-random) keep the
unfused all-KV-outer KL, as ``indexer_kl_triton`` decides. Results equal the two separate ops up to
float summation order (tests/kernels/test_fused_kl_triton.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..attention.triton_bwd import KLKeyGrad, sparse_attention_bwd
from ..attention.triton_common import bwd_config, check_shapes, fwd_config, interpreting
from ..attention.triton_fwd import (check_sparse_inputs, forward_schedule, sparse_attention_fwd,
                                    sparse_attention_triton)
from ..layout import VarlenLayout
from .triton import _norm, _sparse_dk, _sparse_forward, indexer_kl_triton, union_schedule_or_none

__all__ = ["sparse_attention_kl_triton", "FUSE_MAX_GROUP"]

FUSE_MAX_GROUP = 4


class _SparseAttentionKLTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_idx, k_idx, topk_idx, layout, block_size, scale, iscale, reduction,
                deterministic, fcfg, bcfg, kl_schedule, defer):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        q_idx, k_idx = q_idx.contiguous(), k_idx.contiguous()
        # The KL's union schedule holds the same block rows (and, at equal tokens per tile, tiles).
        qk_rows, blk_rows, tiles = forward_schedule(topk_idx, layout, block_size,
                                                    fcfg.tokens_per_tile(q.shape[1] // k.shape[1]), kl_schedule)
        out, lse = sparse_attention_fwd(q, k, v, tiles, qk_rows, block_size, scale, fcfg)
        want_idx = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        # Deferred: student statistics only; dq_idx's buffer then holds sum_j Q_j k_idx_j.
        kl_rows, lses, psum, dq_idx, _, _ = _sparse_forward(q, k, lse, q_idx, k_idx, topk_idx, layout, block_size,
                                                            scale, iscale, want_idx or defer, kl_schedule,
                                                            teacher=not defer)
        norm = _norm(layout, k.shape[1], reduction)
        ctx.save_for_backward(q, k, v, out, lse, blk_rows, qk_rows, q_idx, k_idx, lses, psum,
                              dq_idx if want_idx or defer else lses)
        ctx.tiles, ctx.layout = tiles, layout
        ctx.args = (block_size, scale, iscale, norm, deterministic, bcfg, layout.total_blocks(block_size),
                    want_idx, defer)
        if defer:
            kl = torch.full((), float("nan"), dtype=torch.float32, device=q.device)
            ctx.kl_value = kl.detach()  # an alias (no graph reference): the backward writes the value
            return out, lse, kl
        return out, lse, (kl_rows.sum(dtype=torch.float64) * norm).to(torch.float32)

    @staticmethod
    def backward(ctx, d_out, d_lse, d_kl):
        q, k, v, out, lse, blk_rows, qk_rows, q_idx, k_idx, lses, psum, dq_idx = ctx.saved_tensors
        block_size, scale, iscale, norm, deterministic, bcfg, max_blocks, want_idx, defer = ctx.args
        if d_out is None:
            d_out = torch.zeros_like(out)
        if d_lse is not None:
            d_lse = d_lse.contiguous().float()
        with_kl = want_idx and d_kl is not None
        group = q.shape[1] // k.shape[1]
        fuse_key = with_kl and ctx.needs_input_grad[4] and group <= FUSE_MAX_GROUP
        kl = None
        if fuse_key or defer:
            kl = KLKeyGrad(q_idx, k_idx, lses, psum, iscale, key_grad=fuse_key,
                           student_mean=dq_idx if defer else None)
        dq, dk, dv, grads = sparse_attention_bwd(q, k, v, out, lse, d_out, d_lse, ctx.tiles, blk_rows, qk_rows,
                                                 block_size, scale, deterministic, bcfg, max_blocks, kl)
        if defer:
            ctx.kl_value.copy_((grads.rows.sum(dtype=torch.float64) * norm).to(torch.float32))
            dq_idx = grads.dq_idx
        d_qi = d_ki = None
        if with_kl:
            coef = d_kl.float() * norm
            if ctx.needs_input_grad[3]:
                d_qi = (dq_idx * coef).to(q_idx.dtype)
            if ctx.needs_input_grad[4]:
                dki = grads.dk_idx if fuse_key else _sparse_dk(
                    q, k, lse, q_idx, k_idx, lses, psum, qk_rows, blk_rows, ctx.layout, block_size, scale, iscale,
                    deterministic)
                d_ki = (dki * coef).to(k_idx.dtype)
        return dq, dk, dv, d_qi, d_ki, None, None, None, None, None, None, None, None, None, None, None


def _fusable(q: torch.Tensor, k: torch.Tensor, q_idx: torch.Tensor, block_size: int, defer: bool) -> bool:
    di = q_idx.shape[2]
    return ((defer or q.shape[1] // k.shape[1] <= FUSE_MAX_GROUP) and q_idx.dtype == q.dtype
            and 16 <= di <= 256 and di & (di - 1) == 0 and block_size <= 256)


def sparse_attention_kl_triton(q, k, v, topk_idx, q_idx, k_idx, layout: VarlenLayout, *, block_size: int,
                               scale: float, index_scale: float, reduction: str = "mean",
                               deterministic: bool = False, defer_kl: bool = False,
                               max_union_waste: Optional[float] = None, check_ids: bool = True):
    """(out [T, Hq, D], lse [T, Hq] fp32, KL scalar): sparse_attention_triton followed by
    indexer_kl_triton(q.detach(), k.detach(), lse.detach(), ...), with KL work moved into the
    attention backward when the union-tile schedule applies (module docstring). defer_kl: the KL
    value is computed by the backward (NaN until then). max_union_waste overrides the KL's union
    threshold (tests force the fused path with inf)."""
    check_sparse_inputs(q, k, v, topk_idx, layout, block_size, check_ids)
    schedule = None
    if _fusable(q, k, q_idx, block_size, defer_kl):
        schedule = union_schedule_or_none(topk_idx, layout, block_size, q.device, deterministic,
                                          max_union_waste)
    if schedule is None:
        out, lse = sparse_attention_triton(q, k, v, topk_idx, layout, block_size=block_size, scale=scale,
                                           deterministic=deterministic, check_ids=False)  # checked above
        kl = indexer_kl_triton(q.detach(), k.detach(), lse.detach(), q_idx, k_idx, topk_idx, layout,
                               block_size=block_size, scale=scale, index_scale=index_scale,
                               reduction=reduction, deterministic=deterministic)
        return out, lse, kl
    t, hq, hkv, dim, group = check_shapes(q, k, v, block_size)
    interp = interpreting()
    fcfg = fwd_config(dim, group, block_size, interp)
    bcfg = bwd_config(dim, group, block_size, interp)
    return _SparseAttentionKLTriton.apply(q, k, v, q_idx, k_idx, topk_idx, layout, block_size, float(scale),
                                          float(index_scale), reduction, bool(deterministic), fcfg, bcfg,
                                          schedule, bool(defer_kl))
