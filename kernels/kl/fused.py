"""Sparse attention + sparse-stage indexer KL in one autograd node (Triton).

Unfused, the KL backward runs its own KV-outer pass that recomputes every head's probability of
every selected (query, key) pair: the teacher. The sparse-attention backward computes exactly these
probabilities in its own KV-outer pass, so the fused node hands the KL's key gradient to that pass
(msa_kernels.attention.triton_bwd, item 5). The KL forward (student LSE, teacher mass, KL value and
the query gradient, eagerly, over union tiles) is union.py's: msa_kernels.kl.union.sparse_forward.

The KV pass computes the student once per token of a step (not per (token, head) row), so fusion
pays off for every group size. Measured on H100 at 32K: the whole layer 1.10x faster at 16/4 heads,
1.13x at 64/8, 1.03x at 64/4 than the two separate ops
(docs/experiments/2026-11-26_index_branch_kernels.md, item 13).
Fusion needs the union-tile KL forward: selections whose tile unions blow up (near-random) keep the
unfused all-KV-outer KL, as ``indexer_kl_triton`` decides. Results equal the two separate ops up to
float summation order (tests/kernels/test_fused_kl_triton.py).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..attention.triton_bwd import KLKeyGrad, sparse_attention_bwd
from ..attention.triton_common import check_shapes, interpreting
from ..attention.triton_fwd import (check_sparse_inputs, forward_schedule, sparse_attention_fwd,
                                    sparse_attention_triton)
from ..layout import VarlenLayout
from ..tuning import BwdConfig, FwdConfig, KLTuning, bwd_config, fwd_config, interpret_tiles, kl_tuning
from .common import norm
from .triton import indexer_kl_triton
from .union import sparse_forward, union_schedule_or_none

__all__ = ["sparse_attention_kl_triton"]


class _SparseAttentionKLTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_idx, k_idx, topk_idx, layout, block_size, scale, iscale, reduction,
                deterministic, fcfg, bcfg, kl_schedule, kl_tune):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        q_idx, k_idx = q_idx.contiguous(), k_idx.contiguous()
        # The KL's union schedule holds the same block rows (and, at equal tokens per tile, tiles).
        qk_rows, blk_rows, tiles = forward_schedule(topk_idx, layout, block_size,
                                                    fcfg.tokens_per_tile(q.shape[1] // k.shape[1]), kl_schedule)
        out, lse = sparse_attention_fwd(q, k, v, tiles, qk_rows, block_size, scale, fcfg)
        want_idx = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        kl, lses, psum, dq_idx, _, _ = sparse_forward(q, k, lse, q_idx, k_idx, layout, block_size, scale, iscale,
                                                      want_idx, kl_schedule, kl_tune)
        factor = norm(layout, k.shape[1], reduction)
        ctx.save_for_backward(q, k, v, out, lse, blk_rows, qk_rows, q_idx, k_idx, lses, psum,
                              dq_idx if want_idx else lses)
        ctx.tiles = tiles
        ctx.args = (block_size, scale, iscale, factor, deterministic, bcfg, layout.total_blocks(block_size),
                    want_idx)
        return out, lse, (kl.sum(dtype=torch.float64) * factor).to(torch.float32)

    @staticmethod
    def backward(ctx, d_out, d_lse, d_kl):
        q, k, v, out, lse, blk_rows, qk_rows, q_idx, k_idx, lses, psum, dq_idx = ctx.saved_tensors
        block_size, scale, iscale, factor, deterministic, bcfg, max_blocks, want_idx = ctx.args
        if d_out is None:
            d_out = torch.zeros_like(out)
        if d_lse is not None:
            d_lse = d_lse.contiguous().float()
        with_kl = want_idx and d_kl is not None
        kl = KLKeyGrad(q_idx, k_idx, lses, psum, iscale) if with_kl and ctx.needs_input_grad[4] else None
        dq, dk, dv, dki = sparse_attention_bwd(q, k, v, out, lse, d_out, d_lse, ctx.tiles, blk_rows, qk_rows,
                                               block_size, scale, deterministic, bcfg, max_blocks, kl)
        d_qi = d_ki = None
        if with_kl:
            coef = d_kl.float() * factor
            if ctx.needs_input_grad[3]:
                d_qi = (dq_idx * coef).to(q_idx.dtype)
            if dki is not None:
                d_ki = (dki * coef).to(k_idx.dtype)
        return (dq, dk, dv, d_qi, d_ki) + (None,) * 11


def _fusable(q: torch.Tensor, q_idx: torch.Tensor, block_size: int) -> bool:
    di = q_idx.shape[2]
    return q_idx.dtype == q.dtype and 16 <= di <= 256 and di & (di - 1) == 0 and block_size <= 256


def sparse_attention_kl_triton(q, k, v, topk_idx, q_idx, k_idx, layout: VarlenLayout, *, block_size: int,
                               scale: float, index_scale: float, reduction: str = "mean",
                               deterministic: bool = False, max_union_waste: Optional[float] = None,
                               check_ids: bool = True, fwd_cfg: Optional[FwdConfig] = None,
                               bwd_cfg: Optional[BwdConfig] = None, kl_tune: Optional[KLTuning] = None):
    """(out [T, Hq, D], lse [T, Hq] fp32, KL scalar): sparse_attention_triton followed by
    indexer_kl_triton(q.detach(), k.detach(), lse.detach(), ...), with the KL's key gradient computed
    inside the attention backward when the union-tile KL forward applies. max_union_waste overrides
    the KL's union threshold (tests force the fused path with inf); fwd_cfg / bwd_cfg / kl_tune
    override the default tiles (msa_kernels.tuning)."""
    check_sparse_inputs(q, k, v, topk_idx, layout, block_size, check_ids)
    t, hq, hkv, dim, group = check_shapes(q, k, v, block_size)
    interp = interpreting()
    fcfg = fwd_cfg or fwd_config(dim, group, block_size, interp)
    bcfg = bwd_cfg or bwd_config(dim, group, block_size, interp)
    kl_tune = kl_tune or kl_tuning(interpret_tiles(q.device))
    schedule = None
    if _fusable(q, q_idx, block_size):
        schedule = union_schedule_or_none(topk_idx, layout, block_size, deterministic, kl_tune, max_union_waste)
    if schedule is None:
        out, lse = sparse_attention_triton(q, k, v, topk_idx, layout, block_size=block_size, scale=scale,
                                           deterministic=deterministic, check_ids=False,  # checked above
                                           fwd_cfg=fcfg, bwd_cfg=bcfg)
        kl = indexer_kl_triton(q.detach(), k.detach(), lse.detach(), q_idx, k_idx, topk_idx, layout,
                               block_size=block_size, scale=scale, index_scale=index_scale,
                               reduction=reduction, deterministic=deterministic, tuning=kl_tune)
        return out, lse, kl
    # The KL's union test (tile rows per pick <= union_max_waste) already answers dq_mode's question
    # (Q-outer while <= auto_ratio) when the attention's tiles hold no more tokens than the KL's
    # (fewer tokens, less waste): take the Q-outer dQ pass without a second host sync then.
    if bcfg.dq_mode == "auto" and fcfg.tokens_per_tile(group) <= schedule[1].tokens_per_tile:
        bcfg = dataclasses.replace(bcfg, dq_mode="qouter")
    return _SparseAttentionKLTriton.apply(q, k, v, q_idx, k_idx, topk_idx, layout, block_size, float(scale),
                                          float(index_scale), reduction, bool(deterministic), fcfg, bcfg,
                                          schedule, kl_tune)
