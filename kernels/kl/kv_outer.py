"""Sparse-stage indexer KL, all-KV-outer algorithm (fp32 atomics; no per-query eager buffers).

Every pass walks the reverse block -> query index (attention/triton_common.build_kv_units): a program
owns a key sub-tile of one (group, block) unit and steps over the queries that picked the block.
  pass 1 (student max): per (group, query) max student logit, by fp32 atomic max;
  pass 2 (forward):     with that max M, sum exp(t - M), sum P, sum P log P and sum P t are plain sums
                        over the row's blocks, so every (block, query) tile adds its share by atomics;
  backward:             dk_idx of the unit's block in registers, dq_idx rows by fp32 atomics.
Selections whose query-tile unions blow up (near-random) take this path: its work is exactly the
picks, whatever the overlap. Not deterministic (atomics); the deterministic mode takes union.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention.triton_common import block_key_rows, build_kv_units, query_key_rows
from ..triton_utils import dot, dot_precision, pow2_at_least_16
from ..tuning import KLTuning
from .common import check_kernel_limits, kv_key_tile, kv_step_rows, kv_unit, norm, strides, teacher_student_tile

__all__ = ["KVOuterKL"]


@triton.jit
def _kl_kv_student_max_kernel(
    QI, KI, QK_ROWS, TOKENS, UNIT_GROUP, UNIT_ROW, UNIT_BEGIN, UNIT_END, MX, Tk, iscale,
    stride_qit, stride_qih, stride_kit, stride_st,
    DI: tl.constexpr, DIP: tl.constexpr, TM: tl.constexpr, BK: tl.constexpr, BKP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Pass 1: per (group, query) max student logit, by fp32 atomic max."""
    r, k_rows, k_ok, beg, end = kv_unit(UNIT_GROUP, UNIT_ROW, UNIT_BEGIN, UNIT_END, Tk, BK, BKP)
    offs_e = tl.arange(0, DIP)
    e_ok = offs_e < DI
    ki = tl.load(KI + k_rows[:, None] * stride_kit + offs_e[None, :],
                 mask=k_ok[:, None] & e_ok[None, :], other=0.0)  # [BKP, DIP]
    for e0 in range(beg, end, TM):
        q_rows, ok, qk_rows = kv_step_rows(TOKENS, QK_ROWS, e0, end, TM)
        qi = tl.load(QI + q_rows[:, None] * stride_qit + r * stride_qih + offs_e[None, :],
                     mask=ok[:, None] & e_ok[None, :], other=0.0)
        t = dot(qi, tl.trans(ki), PRECISION) * iscale
        mask = ok[:, None] & k_ok[None, :] & (k_rows[None, :] <= qk_rows[:, None])
        mx = tl.max(tl.where(mask, t, float("-inf")), 1)
        tl.atomic_max(MX + r * stride_st + q_rows, mx, mask=ok & (mx > float("-inf")))


@triton.jit
def _kl_kv_fwd_kernel(
    Q, K, LSE, QI, KI, QK_ROWS, TOKENS, UNIT_GROUP, UNIT_ROW, UNIT_BEGIN, UNIT_END,
    MX, L, PSUM, PLOGP, PT, Tk, scale, iscale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
    stride_qit, stride_qih, stride_kit, stride_st,
    G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
    TM: tl.constexpr, BK: tl.constexpr, BKP: tl.constexpr, PRECISION: tl.constexpr,
):
    """Pass 2: additive KL statistics per (group, query), by fp32 atomics."""
    r, k_rows, k_ok, beg, end = kv_unit(UNIT_GROUP, UNIT_ROW, UNIT_BEGIN, UNIT_END, Tk, BK, BKP)
    for e0 in range(beg, end, TM):
        q_rows, ok, qk_rows = kv_step_rows(TOKENS, QK_ROWS, e0, end, TM)
        p, t, qi, ki, mask = teacher_student_tile(
            Q, K, LSE, QI, KI, q_rows, ok, qk_rows, k_rows, k_ok, r, scale, iscale,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
            stride_qit, stride_qih, stride_kit, G, D, DP, DI, DIP, PRECISION)
        mx = tl.load(MX + r * stride_st + q_rows, mask=ok, other=0.0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        e = tl.exp(t - mx[:, None])  # 0 off support
        plogp = tl.where(p > 0, p * tl.log(tl.where(p > 0, p, 1.0)), 0.0)
        rows = r * stride_st + q_rows
        tl.atomic_add(L + rows, tl.sum(e, 1), mask=ok)
        tl.atomic_add(PSUM + rows, tl.sum(p, 1), mask=ok)
        tl.atomic_add(PLOGP + rows, tl.sum(plogp, 1), mask=ok)
        tl.atomic_add(PT + rows, tl.sum(p * tl.where(mask, t, 0.0), 1), mask=ok)


@triton.jit
def _kl_kv_bwd_kernel(
    Q, K, LSE, QI, KI, LSES, PSUM, QK_ROWS, TOKENS, UNIT_GROUP, UNIT_ROW, UNIT_BEGIN, UNIT_END,
    DQ, DK, Tk, scale, iscale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
    stride_qit, stride_qih, stride_kit, stride_st, stride_dqt, stride_dqh, stride_dkt,
    G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
    TM: tl.constexpr, BK: tl.constexpr, BKP: tl.constexpr, PRECISION: tl.constexpr,
):
    """Backward: dk_idx of the unit's block in registers, dq_idx rows by fp32 atomics."""
    r, k_rows, k_ok, beg, end = kv_unit(UNIT_GROUP, UNIT_ROW, UNIT_BEGIN, UNIT_END, Tk, BK, BKP)
    offs_e = tl.arange(0, DIP)
    e_ok = offs_e < DI
    dk = tl.zeros([BKP, DIP], tl.float32)
    for e0 in range(beg, end, TM):
        q_rows, ok, qk_rows = kv_step_rows(TOKENS, QK_ROWS, e0, end, TM)
        p, t, qi, ki, mask = teacher_student_tile(
            Q, K, LSE, QI, KI, q_rows, ok, qk_rows, k_rows, k_ok, r, scale, iscale,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
            stride_qit, stride_qih, stride_kit, G, D, DP, DI, DIP, PRECISION)
        lse_t = tl.load(LSES + r * stride_st + q_rows, mask=ok, other=0.0)
        psum = tl.load(PSUM + r * stride_st + q_rows, mask=ok, other=0.0)
        ds = (tl.exp(t - lse_t[:, None]) * psum[:, None] - p).to(qi.dtype)  # [TM, BKP]
        dk += dot(tl.trans(ds), qi, PRECISION)
        dq = dot(ds, ki, PRECISION) * iscale  # [TM, DIP]
        tl.atomic_add(DQ + q_rows[:, None] * stride_dqt + r * stride_dqh + offs_e[None, :], dq,
                      mask=ok[:, None] & e_ok[None, :])
    tl.atomic_add(DK + k_rows[:, None] * stride_dkt + offs_e[None, :], dk * iscale,
                  mask=k_ok[:, None] & e_ok[None, :] & (end > beg))


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
def kv_units(topk_idx, layout, block_size, chunk):
    """(KV-unit schedule, qk_rows [T] int32) of a selection."""
    blk_rows = block_key_rows(topk_idx, layout, block_size)  # [Hkv, T, K] int64
    units = build_kv_units(blk_rows, chunk, layout.total_k, layout.total_blocks(block_size))
    return units, query_key_rows(layout)


def _launch_args(q, k, q_idx, k_idx, units, block_size, tuning: KLTuning):
    t, hq, hkv, d, di, g = check_kernel_limits(q, k, q_idx, k_idx)
    bn = kv_key_tile(block_size, tuning.kv_bn)
    grid = (units.num_units, triton.cdiv(block_size, bn))
    meta = dict(DI=di, DIP=pow2_at_least_16(di), TM=tuning.kv_tm, BK=block_size, BKP=bn,
                PRECISION=dot_precision(q.dtype), num_stages=tuning.stages)
    sched = (units.tokens, units.unit_group, units.unit_block_row, units.unit_begin, units.unit_end)
    return grid, meta, sched, dict(G=g, D=d, DP=pow2_at_least_16(d))


def _forward(q, k, lse, q_idx, k_idx, units, qk_rows, block_size, scale, iscale, tuning: KLTuning):
    """Per (group, query) KL, student LSE and teacher mass [Hkv, T]."""
    t, hkv = q.shape[0], k.shape[1]
    dev = q.device
    mx = torch.full((hkv, t), float("-inf"), dtype=torch.float32, device=dev)
    stats = torch.zeros((4, hkv, t), dtype=torch.float32, device=dev)  # l, psum, plogp, pt
    if units.num_units:
        grid, meta, sched, heads = _launch_args(q, k, q_idx, k_idx, units, block_size, tuning)
        _kl_kv_student_max_kernel[grid](
            q_idx, k_idx, qk_rows, *sched, mx, k.shape[0], iscale,
            q_idx.stride(0), q_idx.stride(1), k_idx.stride(0), mx.stride(0),
            num_warps=tuning.kv_fwd_warps, **meta)
        _kl_kv_fwd_kernel[grid](
            q, k, lse, q_idx, k_idx, qk_rows, *sched, mx, stats[0], stats[1], stats[2], stats[3],
            k.shape[0], scale, iscale, *strides(q, k, lse, q_idx, k_idx), mx.stride(0),
            num_warps=tuning.kv_fwd_warps, **heads, **meta)
    l, psum, plogp, pt = stats.unbind(0)
    has = l > 0
    lses = torch.where(has, mx + torch.log(torch.where(has, l, torch.ones_like(l))), torch.zeros_like(l))
    kl = plogp - pt + lses * psum
    return kl, lses.contiguous(), psum.contiguous()


def _backward(q, k, lse, q_idx, k_idx, lses, psum, units, qk_rows, block_size, scale, iscale, tuning: KLTuning):
    t, di = q.shape[0], q_idx.shape[2]
    dq = torch.zeros((t, k.shape[1], di), dtype=torch.float32, device=q.device)
    dk = torch.zeros((k_idx.shape[0], di), dtype=torch.float32, device=q.device)
    if units.num_units:
        grid, meta, sched, heads = _launch_args(q, k, q_idx, k_idx, units, block_size, tuning)
        _kl_kv_bwd_kernel[grid](
            q, k, lse, q_idx, k_idx, lses, psum, qk_rows, *sched, dq, dk, k.shape[0], scale, iscale,
            *strides(q, k, lse, q_idx, k_idx), lses.stride(0), dq.stride(0), dq.stride(1), dk.stride(0),
            num_warps=tuning.kv_bwd_warps, **heads, **meta)
    return dq, dk


class KVOuterKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, lse, q_idx, k_idx, topk_idx, layout, block_size, scale, iscale, reduction, tuning):
        units, qk_rows = kv_units(topk_idx, layout, block_size, tuning.kv_chunk)
        kl, lses, psum = _forward(q, k, lse, q_idx, k_idx, units, qk_rows, block_size, scale, iscale, tuning)
        factor = norm(layout, k.shape[1], reduction)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            ctx.save_for_backward(q, k, lse, q_idx, k_idx, lses, psum, qk_rows)
            ctx.units = units
            ctx.args = (block_size, scale, iscale, factor, tuning)
        return (kl.sum(dtype=torch.float64) * factor).to(torch.float32)

    @staticmethod
    def backward(ctx, grad):
        q, k, lse, q_idx, k_idx, lses, psum, qk_rows = ctx.saved_tensors
        block_size, scale, iscale, factor, tuning = ctx.args
        dq, dk = _backward(q, k, lse, q_idx, k_idx, lses, psum, ctx.units, qk_rows, block_size, scale, iscale,
                           tuning)
        coef = grad.float() * factor
        dq_idx = (dq * coef).to(q_idx.dtype) if ctx.needs_input_grad[3] else None
        dk_idx = (dk * coef).to(k_idx.dtype) if ctx.needs_input_grad[4] else None
        return (None,) * 3 + (dq_idx, dk_idx) + (None,) * 7
