"""Warmup-stage indexer KL over the full causal context (Triton), forward + backward to q_idx, k_idx.

Forward: Q tiles of one fragment x all causal key tiles (the shared tile math of common.py); a first
pass computes the teacher LSE per head when the caller has none. dq_idx is written eagerly.
dk_idx: key tiles x the query tiles that see them; fp32 atomics, or in deterministic mode one program
per key tile adding into a per-group buffer, launched in rounds so context-parallel fragments that
share key rows never race. Memory stays O(T x tile).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..layout import VarlenLayout
from ..triton_utils import (dot, dot_precision, frag_table, last_dim_contiguous, pow2_at_least_16,
                           query_tile_table)
from ..tuning import KLTuning, interpret_tiles, kl_tuning
from .common import (accumulate_row_stats, check_kernel_limits, dk_buffer, dk_tile, finish_rows, norm, store_dk,
                     strides, teacher_student_tile)

__all__ = ["indexer_kl_dense_triton"]


@triton.jit
def _dense_lse_kernel(
    Q, K, LSE_OUT, TILE_FRAG, TILE_M0, FRAG, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
    G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Teacher LSE of full causal attention, per query head (natural log)."""
    tile = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    r = head // G
    f = tl.load(TILE_FRAG + tile).to(tl.int64)
    m0 = tl.load(TILE_M0 + tile).to(tl.int64)
    q_start = tl.load(FRAG + f * 4 + 0)
    q_len = tl.load(FRAG + f * 4 + 1)
    k_start = tl.load(FRAG + f * 4 + 2)
    k_len = tl.load(FRAG + f * 4 + 3)
    offs_m = m0 + tl.arange(0, BM).to(tl.int64)
    row_ok = offs_m < q_len
    pos = k_len - q_len + offs_m
    offs_d = tl.arange(0, DP)
    d_ok = offs_d < D
    q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    hi = k_len - q_len + tl.minimum(m0 + BM, q_len)  # keys [0, hi) are visible to some row
    for n0 in range(0, hi, BN):
        offs_n = n0 + tl.arange(0, BN).to(tl.int64)
        k = tl.load(K + (k_start + offs_n)[:, None] * stride_kt + r * stride_kh + offs_d[None, :],
                    mask=(offs_n < k_len)[:, None] & d_ok[None, :], other=0.0)
        s = dot(q, tl.trans(k), PRECISION) * scale
        s = tl.where(row_ok[:, None] & (offs_n[None, :] <= pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(LSE_OUT + (q_start + offs_m) * stride_lt + head * stride_lh, lse, mask=row_ok)


@triton.jit
def _kl_dense_fwd_kernel(
    Q, K, LSE, QI, KI, TILE_FRAG, TILE_M0, FRAG,
    KL, LSES, PSUM, DQ,
    scale, iscale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
    stride_qit, stride_qih, stride_kit, stride_st, stride_dqt, stride_dqh,
    G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, WANT_DQ: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    f = tl.load(TILE_FRAG + tile).to(tl.int64)
    m0 = tl.load(TILE_M0 + tile).to(tl.int64)
    q_start = tl.load(FRAG + f * 4 + 0)
    q_len = tl.load(FRAG + f * 4 + 1)
    k_start = tl.load(FRAG + f * 4 + 2)
    k_len = tl.load(FRAG + f * 4 + 3)
    offs_m = m0 + tl.arange(0, BM).to(tl.int64)
    row_ok = offs_m < q_len
    q_rows = q_start + offs_m
    qk_rows = k_start + k_len - q_len + offs_m

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    psum = tl.zeros([BM], tl.float32)
    plogp = tl.zeros([BM], tl.float32)
    pt = tl.zeros([BM], tl.float32)
    acc_e = tl.zeros([BM, DIP], tl.float32)
    acc_p = tl.zeros([BM, DIP], tl.float32)
    hi = k_len - q_len + tl.minimum(m0 + BM, q_len)
    for n0 in range(0, hi, BN):
        offs_n = n0 + tl.arange(0, BN).to(tl.int64)
        k_rows = k_start + offs_n
        p, t, qi, ki, mask = teacher_student_tile(
            Q, K, LSE, QI, KI, q_rows, row_ok, qk_rows, k_rows, offs_n < k_len, r, scale, iscale,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
            stride_qit, stride_qih, stride_kit, G, D, DP, DI, DIP, PRECISION)
        m_i, l_i, psum, plogp, pt, acc_e, acc_p = accumulate_row_stats(
            p, t, ki, mask, m_i, l_i, psum, plogp, pt, acc_e, acc_p, WANT_DQ, PRECISION)
    finish_rows(KL, LSES, PSUM, DQ, q_rows, row_ok, r, stride_st, stride_dqt, stride_dqh,
                m_i, l_i, psum, plogp, pt, acc_e, acc_p, iscale, DI, DIP, WANT_DQ)


@triton.jit
def _kl_dense_dk_kernel(
    Q, K, LSE, QI, KI, LSES, PSUM, KTILE_FRAG, KTILE_N0, FRAG,
    DK, scale, iscale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
    stride_qit, stride_qih, stride_kit, stride_st, stride_dkh, stride_dkt,
    G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, ATOMIC: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    f = tl.load(KTILE_FRAG + tile).to(tl.int64)
    n0 = tl.load(KTILE_N0 + tile).to(tl.int64)
    q_start = tl.load(FRAG + f * 4 + 0)
    q_len = tl.load(FRAG + f * 4 + 1)
    k_start = tl.load(FRAG + f * 4 + 2)
    k_len = tl.load(FRAG + f * 4 + 3)
    pos_off = k_len - q_len
    offs_n = n0 + tl.arange(0, BN).to(tl.int64)
    k_rows = k_start + offs_n
    k_ok = offs_n < k_len
    dk = tl.zeros([BN, DIP], tl.float32)
    # Queries at positions >= n0 see this key tile: local offsets from n0 - pos_off on.
    lo = tl.maximum(n0 - pos_off, 0)
    lo = (lo // BM) * BM
    for m0 in range(lo, q_len, BM):
        offs_m = m0 + tl.arange(0, BM).to(tl.int64)
        ok = offs_m < q_len
        dk += dk_tile(Q, K, LSE, QI, KI, LSES, PSUM, q_start + offs_m, ok, k_start + pos_off + offs_m,
                      k_rows, k_ok, r, scale, iscale,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
                      stride_qit, stride_qih, stride_kit, stride_st, G, D, DP, DI, DIP, PRECISION)
    store_dk(DK, k_rows, k_ok, r, dk * iscale, stride_dkh, stride_dkt, DI, DIP, ATOMIC)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
def _dense_lse(q, k, scale, frag, tile_frag, tile_m0, tuning: KLTuning):
    t, hq, d = q.shape
    g = hq // k.shape[1]
    lse = torch.empty((t, hq), dtype=torch.float32, device=q.device)
    if tile_frag.numel():
        _dense_lse_kernel[(tile_frag.numel(), hq)](
            q, k, lse, tile_frag, tile_m0, frag, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0), lse.stride(1),
            G=g, D=d, DP=pow2_at_least_16(d), BM=tuning.dense_bm, BN=tuning.dense_bn,
            PRECISION=dot_precision(q.dtype), num_warps=tuning.dense_warps, num_stages=tuning.stages)
    return lse


def _key_tile_rounds(layout: VarlenLayout, bn: int, device):
    """Key-tile launch tables, split into rounds in which no two fragments share key rows.

    Fragments that share a key sequence (context parallel) would add into the same dk rows; putting
    them in different launches keeps the deterministic (non-atomic) mode race-free.
    """
    seen: dict = {}
    rounds: list = []
    for fr in layout.fragments:
        if fr.q_len == 0:
            continue
        key = (fr.k_start, fr.k_len)
        rnd = seen.get(key, 0)
        seen[key] = rnd + 1
        while len(rounds) <= rnd:
            rounds.append([])
        rounds[rnd].extend((fr.index, n0) for n0 in range(0, fr.k_len, bn))
    out = []
    for tiles in rounds:
        tiles.sort(key=lambda x: x[1])  # early key tiles see the most queries: launch them first
        out.append((torch.tensor([x[0] for x in tiles], dtype=torch.int32, device=device),
                    torch.tensor([x[1] for x in tiles], dtype=torch.int32, device=device)))
    return out


class _IndexerKLDenseTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, lse, q_idx, k_idx, layout, scale, iscale, reduction, deterministic, tuning):
        t, hq, hkv, d, di, g = check_kernel_limits(q, k, q_idx, k_idx)
        dev = q.device
        bm, bn = tuning.dense_bm, tuning.dense_bn
        frag = frag_table(layout, dev)
        tile_frag, tile_m0 = query_tile_table(layout, bm, dev)
        if lse is None:
            lse = _dense_lse(q, k, scale, frag, tile_frag, tile_m0, tuning)
        want = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        kl = torch.empty((hkv, t), dtype=torch.float32, device=dev)
        lses = torch.empty_like(kl)
        psum = torch.empty_like(kl)
        dq = torch.empty((t, hkv, di), dtype=torch.float32, device=dev) if want else kl
        if tile_frag.numel():
            _kl_dense_fwd_kernel[(tile_frag.numel(), hkv)](
                q, k, lse, q_idx, k_idx, tile_frag, tile_m0, frag, kl, lses, psum, dq, scale, iscale,
                *strides(q, k, lse, q_idx, k_idx), kl.stride(0),
                dq.stride(0) if want else 0, dq.stride(1) if want else 0,
                G=g, D=d, DP=pow2_at_least_16(d), DI=di, DIP=pow2_at_least_16(di), BM=bm, BN=bn,
                WANT_DQ=want, PRECISION=dot_precision(q.dtype), num_warps=tuning.dense_warps,
                num_stages=tuning.stages)
        factor = norm(layout, hkv, reduction)
        if want:
            ctx.save_for_backward(q, k, lse, q_idx, k_idx, lses, psum, dq, frag)
            ctx.args = (layout, scale, iscale, factor, deterministic, tuning)
        return (kl.sum(dtype=torch.float64) * factor).to(torch.float32)

    @staticmethod
    def backward(ctx, grad):
        q, k, lse, q_idx, k_idx, lses, psum, dq, frag = ctx.saved_tensors
        layout, scale, iscale, factor, deterministic, tuning = ctx.args
        bm, bn = tuning.dense_bm, tuning.dense_bn
        t, hq, hkv, d, di, g = check_kernel_limits(q, k, q_idx, k_idx)
        coef = grad.float() * factor
        dq_idx = (dq * coef).to(q_idx.dtype) if ctx.needs_input_grad[3] else None
        dk_idx = None
        if ctx.needs_input_grad[4]:
            dk = dk_buffer(k_idx, hkv, deterministic)
            for ktf, ktn in _key_tile_rounds(layout, bn, q.device):
                _kl_dense_dk_kernel[(ktf.numel(), hkv)](
                    q, k, lse, q_idx, k_idx, lses, psum, ktf, ktn, frag, dk, scale, iscale,
                    *strides(q, k, lse, q_idx, k_idx), lses.stride(0),
                    dk.stride(0) if deterministic else 0, dk.stride(1),
                    G=g, D=d, DP=pow2_at_least_16(d), DI=di, DIP=pow2_at_least_16(di), BM=bm, BN=bn,
                    ATOMIC=not deterministic, PRECISION=dot_precision(q.dtype),
                    num_warps=tuning.dense_warps, num_stages=tuning.stages)
            dk_idx = (dk.sum(0) * coef).to(k_idx.dtype)
        return (None,) * 3 + (dq_idx, dk_idx) + (None,) * 6


def indexer_kl_dense_triton(q, k, q_idx, k_idx, layout: VarlenLayout, *, scale: float,
                            index_scale: float, lse: Optional[torch.Tensor] = None,
                            reduction: str = "mean", deterministic: bool = False,
                            tuning: Optional[KLTuning] = None) -> torch.Tensor:
    """Warmup-stage KL over the full causal context -> fp32 scalar; grads to q_idx, k_idx only.
    ``tuning`` overrides the default tiles (msa_kernels.tuning.kl_tuning)."""
    q, k, q_idx, k_idx = last_dim_contiguous(q.detach(), k.detach(), q_idx, k_idx)
    if lse is not None:
        lse = lse.detach().float()
    return _IndexerKLDenseTriton.apply(q, k, lse, q_idx, k_idx, layout, float(scale),
                                       float(index_scale), reduction, bool(deterministic),
                                       tuning or kl_tuning(interpret_tiles(q.device)))
