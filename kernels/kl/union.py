"""Sparse-stage indexer KL, union-tile algorithm: Q-outer forward + KV-outer dk_idx pass.

Forward: one program per (tile of TM consecutive query rows, group) loops over the UNION of the
blocks its tokens selected (attention/triton_common.build_q_tiles; a bitmask says which token picked
the block), accumulates the per-row KL statistics and writes dq_idx eagerly when gradients are
needed, so the teacher is recomputed only once more, in the dk_idx pass.
dk_idx: KV units from the reverse block -> query index (build_kv_units); fp32 atomics, or in
deterministic mode one unit per (group, block) adding into a per-group buffer.

Neighbouring tokens that share blocks (local + shared long-range patterns) make the union forward
nearly waste-free and spare the backward its dq_idx atomics; near-random selections blow the union
up (~16x) and take kv_outer.py instead (``union_schedule_or_none`` decides). The fused attention+KL
node (fused.py) reuses this forward.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..attention.triton_common import block_key_rows, build_kv_units, build_q_tiles, query_key_rows
from ..triton_utils import dot_precision, pow2_at_least_16
from ..tuning import KLTuning
from .common import (accumulate_row_stats, check_kernel_limits, dk_buffer, dk_tile, finish_rows, kv_key_tile,
                     kv_step_rows, kv_unit, norm, store_dk, strides, teacher_student_tile)

__all__ = ["union_schedule_or_none", "sparse_forward", "UnionKL"]


@triton.jit
def _kl_sparse_fwd_kernel(
    Q, K, LSE, QI, KI, BLOCK_ROWS, TOKEN_MASKS, COUNTS, QK_ROWS,
    KL, LSES, PSUM, DQ,
    T, Tk, scale, iscale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
    stride_qit, stride_qih, stride_kit, stride_st, stride_dqt, stride_dqh,
    stride_br, stride_bt, stride_cr,
    G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
    TM: tl.constexpr, BK: tl.constexpr, BKP: tl.constexpr,
    WANT_DQ: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1).to(tl.int64)
    offs_tm = tl.arange(0, TM)
    q_rows = tile * TM + offs_tm.to(tl.int64)  # [TM]
    row_ok = q_rows < T
    qk_rows = tl.load(QK_ROWS + q_rows, mask=row_ok, other=-1).to(tl.int64)
    offs_n = tl.arange(0, BKP).to(tl.int64)

    m_i = tl.full([TM], float("-inf"), tl.float32)
    l_i = tl.zeros([TM], tl.float32)
    psum = tl.zeros([TM], tl.float32)
    plogp = tl.zeros([TM], tl.float32)
    pt = tl.zeros([TM], tl.float32)
    acc_e = tl.zeros([TM, DIP], tl.float32)
    acc_p = tl.zeros([TM, DIP], tl.float32)

    count = tl.load(COUNTS + r * stride_cr + tile)
    for u in range(0, count):
        blk = tl.load(BLOCK_ROWS + r * stride_br + tile * stride_bt + u).to(tl.int64)
        bits = tl.load(TOKEN_MASKS + r * stride_br + tile * stride_bt + u)
        picked = ((bits >> offs_tm.to(tl.int64)) & 1) != 0  # [TM]
        k_rows = blk + offs_n
        k_ok = (offs_n < BK) & (k_rows < Tk)
        p, t, qi, ki, mask = teacher_student_tile(
            Q, K, LSE, QI, KI, q_rows, row_ok & picked, qk_rows, k_rows, k_ok, r, scale, iscale,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
            stride_qit, stride_qih, stride_kit, G, D, DP, DI, DIP, PRECISION)
        m_i, l_i, psum, plogp, pt, acc_e, acc_p = accumulate_row_stats(
            p, t, ki, mask, m_i, l_i, psum, plogp, pt, acc_e, acc_p, WANT_DQ, PRECISION)
    finish_rows(KL, LSES, PSUM, DQ, q_rows, row_ok, r, stride_st, stride_dqt, stride_dqh,
                m_i, l_i, psum, plogp, pt, acc_e, acc_p, iscale, DI, DIP, WANT_DQ)


@triton.jit
def _kl_sparse_dk_kernel(
    Q, K, LSE, QI, KI, LSES, PSUM, QK_ROWS,
    TOKENS, UNIT_GROUP, UNIT_ROW, UNIT_BEGIN, UNIT_END,
    DK, Tk, scale, iscale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
    stride_qit, stride_qih, stride_kit, stride_st, stride_dkh, stride_dkt,
    G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
    TM: tl.constexpr, BK: tl.constexpr, BKP: tl.constexpr,
    ATOMIC: tl.constexpr, PRECISION: tl.constexpr,
):
    r, k_rows, k_ok, beg, end = kv_unit(UNIT_GROUP, UNIT_ROW, UNIT_BEGIN, UNIT_END, Tk, BK, BKP)
    dk = tl.zeros([BKP, DIP], tl.float32)
    for e0 in range(beg, end, TM):
        q_rows, ok, qk_rows = kv_step_rows(TOKENS, QK_ROWS, e0, end, TM)
        dk += dk_tile(Q, K, LSE, QI, KI, LSES, PSUM, q_rows, ok, qk_rows, k_rows, k_ok, r, scale,
                      iscale, stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
                      stride_qit, stride_qih, stride_kit, stride_st, G, D, DP, DI, DIP, PRECISION)
    if end > beg:  # empty units of the upper-bound grid must not touch rows another unit owns
        store_dk(DK, k_rows, k_ok, r, dk * iscale, stride_dkh, stride_dkt, DI, DIP, ATOMIC)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
def _union_schedule(topk_idx, layout, block_size, tuning: KLTuning):
    """(blk_rows [Hkv, T, K], Q-tile union schedule) of the union-tile forward."""
    blk_rows = block_key_rows(topk_idx, layout, block_size)  # [Hkv, T, K] int64
    return blk_rows, build_q_tiles(blk_rows, tuning.qtile_tm)


def _union_waste(blk_rows, sched) -> float:
    """Tile rows the union forward computes per useful (token, block) pick (1 = no waste; one sync)."""
    union, picks = torch.stack([sched.counts.sum(dtype=torch.int64), (blk_rows >= 0).sum()]).tolist()
    return union * sched.tokens_per_tile / max(1, picks)


def union_schedule_or_none(topk_idx, layout, block_size, deterministic: bool, tuning: KLTuning,
                           max_waste: Optional[float] = None):
    """The union-tile schedule when the KL takes the union forward, else None (kv_outer.py).

    Taken while the union forward computes at most ``max_waste`` (default tuning.union_max_waste)
    tile rows per useful pick; the deterministic mode always takes it (no atomics)."""
    if deterministic:
        return _union_schedule(topk_idx, layout, block_size, tuning)
    max_waste = tuning.union_max_waste if max_waste is None else max_waste
    if max_waste <= 0:
        return None
    schedule = _union_schedule(topk_idx, layout, block_size, tuning)
    return schedule if _union_waste(*schedule) <= max_waste else None


def sparse_forward(q, k, lse, q_idx, k_idx, layout, block_size, scale, iscale, want_dq, schedule,
                   tuning: KLTuning):
    """Union-tile forward -> (kl, lses, psum [Hkv, T] fp32, dq_idx [T, Hkv, Di] fp32 or a dummy,
    qk_rows, blk_rows). ``schedule`` from union_schedule_or_none."""
    t, hq, hkv, d, di, g = check_kernel_limits(q, k, q_idx, k_idx)
    dev = q.device
    blk_rows, sched = schedule
    tm = sched.tokens_per_tile
    qk_rows = query_key_rows(layout)  # [T] int32
    kl = torch.empty((hkv, t), dtype=torch.float32, device=dev)
    lses = torch.empty_like(kl)
    psum = torch.empty_like(kl)
    dq = torch.empty((t, hkv, di), dtype=torch.float32, device=dev) if want_dq else kl
    if t == 0:
        return kl, lses, psum, dq, qk_rows, blk_rows
    _kl_sparse_fwd_kernel[(sched.num_tiles, hkv)](
        q, k, lse, q_idx, k_idx, sched.block_rows, sched.token_masks, sched.counts, qk_rows,
        kl, lses, psum, dq, t, k.shape[0], scale, iscale,
        *strides(q, k, lse, q_idx, k_idx), kl.stride(0),
        dq.stride(0) if want_dq else 0, dq.stride(1) if want_dq else 0,
        sched.block_rows.stride(0), sched.block_rows.stride(1), sched.counts.stride(0),
        G=g, D=d, DP=pow2_at_least_16(d), DI=di, DIP=pow2_at_least_16(di), TM=tm, BK=block_size,
        BKP=pow2_at_least_16(block_size), WANT_DQ=want_dq, PRECISION=dot_precision(q.dtype),
        num_warps=tuning.qtile_warps, num_stages=tuning.stages,
    )
    return kl, lses, psum, dq, qk_rows, blk_rows


def _sparse_dk(q, k, lse, q_idx, k_idx, lses, psum, qk_rows, blk_rows, layout, block_size, scale, iscale,
               deterministic, tuning: KLTuning):
    t, hq, hkv, d, di, g = check_kernel_limits(q, k, q_idx, k_idx)
    chunk = 0 if deterministic else tuning.kv_chunk
    units = build_kv_units(blk_rows, chunk, k.shape[0], layout.total_blocks(block_size))
    dk = dk_buffer(k_idx, hkv, deterministic)
    if units.num_units == 0:
        return dk.sum(0)
    bn = kv_key_tile(block_size, tuning.kv_bn)
    _kl_sparse_dk_kernel[(units.num_units, triton.cdiv(block_size, bn))](
        q, k, lse, q_idx, k_idx, lses, psum, qk_rows,
        units.tokens, units.unit_group, units.unit_block_row, units.unit_begin, units.unit_end,
        dk, k.shape[0], scale, iscale,
        *strides(q, k, lse, q_idx, k_idx), lses.stride(0),
        dk.stride(0) if deterministic else 0, dk.stride(1),
        G=g, D=d, DP=pow2_at_least_16(d), DI=di, DIP=pow2_at_least_16(di), TM=tuning.kv_tm, BK=block_size,
        BKP=bn, ATOMIC=not deterministic, PRECISION=dot_precision(q.dtype),
        num_warps=tuning.kv_bwd_warps, num_stages=tuning.stages,
    )
    return dk.sum(0)


class UnionKL(torch.autograd.Function):
    """Union-tile Q-outer forward (eager dq_idx, no atomics) + KV-outer dk_idx pass: fp32 atomics over
    chunked units, or (deterministic) one unit per (group, block) into per-group buffers."""

    @staticmethod
    def forward(ctx, q, k, lse, q_idx, k_idx, layout, block_size, scale, iscale, reduction, deterministic,
                schedule, tuning):
        want = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        kl, lses, psum, dq, qk_rows, blk_rows = sparse_forward(
            q, k, lse, q_idx, k_idx, layout, block_size, scale, iscale, want, schedule, tuning)
        factor = norm(layout, k.shape[1], reduction)
        if want:
            ctx.save_for_backward(q, k, lse, q_idx, k_idx, lses, psum, dq, qk_rows, blk_rows)
            ctx.args = (layout, block_size, scale, iscale, factor, deterministic, tuning)
        return (kl.sum(dtype=torch.float64) * factor).to(torch.float32)

    @staticmethod
    def backward(ctx, grad):
        q, k, lse, q_idx, k_idx, lses, psum, dq, qk_rows, blk_rows = ctx.saved_tensors
        layout, block_size, scale, iscale, factor, deterministic, tuning = ctx.args
        coef = grad.float() * factor
        dq_idx = (dq * coef).to(q_idx.dtype) if ctx.needs_input_grad[3] else None
        dk_idx = None
        if ctx.needs_input_grad[4]:
            dk = _sparse_dk(q, k, lse, q_idx, k_idx, lses, psum, qk_rows, blk_rows, layout, block_size,
                            scale, iscale, deterministic, tuning)
            dk_idx = (dk * coef).to(k_idx.dtype)
        return (None,) * 3 + (dq_idx, dk_idx) + (None,) * 8
