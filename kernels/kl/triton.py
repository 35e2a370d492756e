"""Triton indexer KL (sparse stage and dense warmup), forward + backward to q_idx and k_idx.

Per (query i, group r), over the support S(i, r):
  teacher P_j = mean_h exp(q_ih . k_jr * scale - lse_ih)        (detached, recomputed from q, k, lse)
  student t_j = q_idx_ir . k_idx_j * index_scale, Q = softmax_S(t)
  KL = sum_j P log P - sum_j P t + lse_t * sum_j P               (one pass: no dependence on lse_t)
  dKL/dt_j = Q_j * sum P - P_j
so dq_idx_i = index_scale * (sumP * (sum_j e^{t_j - m} k_idx_j) / l - sum_j P_j k_idx_j): the Q-outer
forward accumulates both sums (the first with an online rescale, like flash attention's output) and
writes dq_idx eagerly when gradients are needed, so the teacher is recomputed only once more, in the
KV-outer dk_idx pass.

Work layout (every inner step is one tile: TM query tokens x one key tile, the G heads of the group
looped so a K tile is reused by TM tokens and G heads):
  sparse fwd  : Q tiles of TM consecutive rows, looping over the UNION of their selected blocks (the
                schedule of attention/triton_common.build_q_tiles, a bitmask says which token picked
                the block).
  sparse dk   : KV units from the reverse block -> query index (build_kv_units); fp32 atomics, or in
                deterministic mode one unit per (group, block) adding into a per-group buffer.
  dense fwd   : Q tiles of one fragment x all causal key tiles; a first pass computes the teacher LSE
                per head when the caller has none.
  dense dk    : key tiles x the query tiles that see them.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..attention.triton_common import block_key_rows, build_kv_units, build_q_tiles, query_key_rows
from ..layout import VarlenLayout
from ..select.triton import dot_precision, ensure_interpreter_compat, pow2_at_least_16, query_tile_table

__all__ = ["indexer_kl_triton", "indexer_kl_dense_triton"]

ensure_interpreter_compat()


# ----------------------------------------------------------------------------------------------
# Shared tile math
# ----------------------------------------------------------------------------------------------
@triton.jit
def _teacher_student_tile(
    Q, K, LSE, QI, KI,
    q_rows, q_ok, qk_rows,  # [M] int64 query rows, row valid, key row of the query's own position
    k_rows, k_ok,  # [N] int64 absolute key rows, row valid
    r, scale, iscale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
    stride_qit, stride_qih, stride_kit,
    G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Teacher probabilities P [M, N], student logits t [M, N] (-inf off support), q_idx [M, DIP],
    k_idx [N, DIP] and the support mask of one (query rows x key rows) tile."""
    mask = q_ok[:, None] & k_ok[None, :] & (k_rows[None, :] <= qk_rows[:, None])  # [M, N]
    offs_d = tl.arange(0, DP)
    d_ok = offs_d < D
    k = tl.load(K + k_rows[:, None] * stride_kt + r * stride_kh + offs_d[None, :],
                mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # [N, DP]
    # One [M, D] x [D, N] dot per head. (Packing the G heads into one [M*G, D] operand with a
    # reshape-sum for the head mean measured 3x slower on H200: see kernels/BENCHMARKS_index.md.)
    p = tl.zeros(mask.shape, tl.float32)
    for h in range(G):
        head = r * G + h
        qh = tl.load(Q + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                     mask=q_ok[:, None] & d_ok[None, :], other=0.0)  # [M, DP]
        s = tl.dot(qh, tl.trans(k), input_precision=PRECISION) * scale  # [M, N]
        lse = tl.load(LSE + q_rows * stride_lt + head * stride_lh, mask=q_ok, other=0.0)  # [M]
        # An empty main-branch support (lse = -inf) contributes p = 0, as in the reference.
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        p += tl.exp(tl.where(mask, s - lse[:, None], float("-inf")))
    p = p / G
    offs_e = tl.arange(0, DIP)
    e_ok = offs_e < DI
    qi = tl.load(QI + q_rows[:, None] * stride_qit + r * stride_qih + offs_e[None, :],
                 mask=q_ok[:, None] & e_ok[None, :], other=0.0)  # [M, DIP]
    ki = tl.load(KI + k_rows[:, None] * stride_kit + offs_e[None, :],
                 mask=k_ok[:, None] & e_ok[None, :], other=0.0)  # [N, DIP]
    t = tl.dot(qi, tl.trans(ki), input_precision=PRECISION) * iscale
    t = tl.where(mask, t, float("-inf"))
    return p, t, qi, ki, mask


@triton.jit
def _accumulate_row_stats(p, t, ki, mask, m_i, l_i, psum, plogp, pt, acc_e, acc_p,
                          WANT_DQ: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one tile into the per-row KL statistics (online student LSE, rescaled dq sums)."""
    m_new = tl.maximum(m_i, tl.max(t, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    e = tl.exp(t - m_safe[:, None])  # 0 off support
    l_i = l_i * alpha + tl.sum(e, 1)
    psum += tl.sum(p, 1)
    plogp += tl.sum(tl.where(p > 0, p * tl.log(tl.where(p > 0, p, 1.0)), 0.0), 1)
    pt += tl.sum(p * tl.where(mask, t, 0.0), 1)
    if WANT_DQ:
        acc_e = acc_e * alpha[:, None] + tl.dot(e.to(ki.dtype), ki, input_precision=PRECISION)
        acc_p += tl.dot(p.to(ki.dtype), ki, input_precision=PRECISION)
    return m_new, l_i, psum, plogp, pt, acc_e, acc_p


@triton.jit
def _finish_rows(KL, LSES, PSUM, DQ, q_rows, q_ok, r, stride_st, stride_dqt, stride_dqh,
                 m_i, l_i, psum, plogp, pt, acc_e, acc_p, iscale,
                 DI: tl.constexpr, DIP: tl.constexpr, WANT_DQ: tl.constexpr):
    has = l_i > 0
    lse_t = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), 0.0)  # reference: empty -> 0
    kl = plogp - pt + lse_t * psum
    tl.store(KL + r * stride_st + q_rows, kl, mask=q_ok)
    tl.store(LSES + r * stride_st + q_rows, lse_t, mask=q_ok)
    tl.store(PSUM + r * stride_st + q_rows, psum, mask=q_ok)
    if WANT_DQ:
        inv_l = tl.where(has, 1.0 / tl.where(has, l_i, 1.0), 0.0)
        dq = (acc_e * (psum * inv_l)[:, None] - acc_p) * iscale  # [M, DIP]
        offs_e = tl.arange(0, DIP)
        tl.store(DQ + q_rows[:, None] * stride_dqt + r * stride_dqh + offs_e[None, :], dq,
                 mask=q_ok[:, None] & (offs_e < DI)[None, :])


@triton.jit
def _dk_tile(Q, K, LSE, QI, KI, LSES, PSUM, q_rows, q_ok, qk_rows, k_rows, k_ok, r, scale, iscale,
             stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
             stride_qit, stride_qih, stride_kit, stride_st,
             G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
             PRECISION: tl.constexpr):
    """Contribution [N, DIP] of one (query rows x key rows) tile to dk_idx (before index_scale)."""
    p, t, qi, ki, mask = _teacher_student_tile(
        Q, K, LSE, QI, KI, q_rows, q_ok, qk_rows, k_rows, k_ok, r, scale, iscale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
        stride_qit, stride_qih, stride_kit, G, D, DP, DI, DIP, PRECISION)
    lse_t = tl.load(LSES + r * stride_st + q_rows, mask=q_ok, other=0.0)
    psum = tl.load(PSUM + r * stride_st + q_rows, mask=q_ok, other=0.0)
    qprob = tl.exp(t - lse_t[:, None])  # 0 off support (t = -inf)
    ds = qprob * psum[:, None] - p  # [M, N] d KL / d t
    return tl.dot(tl.trans(ds.to(qi.dtype)), qi, input_precision=PRECISION)


@triton.jit
def _store_dk(DK, k_rows, k_ok, r, dk, stride_dkh, stride_dkt,
              DI: tl.constexpr, DIP: tl.constexpr, ATOMIC: tl.constexpr):
    offs_e = tl.arange(0, DIP)
    ptrs = DK + r * stride_dkh + k_rows[:, None] * stride_dkt + offs_e[None, :]
    msk = k_ok[:, None] & (offs_e < DI)[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, dk, mask=msk)
    else:
        # Deterministic mode: one program owns these rows of group r's buffer in this launch.
        tl.store(ptrs, tl.load(ptrs, mask=msk, other=0.0) + dk, mask=msk)


# ----------------------------------------------------------------------------------------------
# Sparse stage
# ----------------------------------------------------------------------------------------------
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
        p, t, qi, ki, mask = _teacher_student_tile(
            Q, K, LSE, QI, KI, q_rows, row_ok & picked, qk_rows, k_rows, k_ok, r, scale, iscale,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
            stride_qit, stride_qih, stride_kit, G, D, DP, DI, DIP, PRECISION)
        m_i, l_i, psum, plogp, pt, acc_e, acc_p = _accumulate_row_stats(
            p, t, ki, mask, m_i, l_i, psum, plogp, pt, acc_e, acc_p, WANT_DQ, PRECISION)
    _finish_rows(KL, LSES, PSUM, DQ, q_rows, row_ok, r, stride_st, stride_dqt, stride_dqh,
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
    unit = tl.program_id(0)
    r = tl.load(UNIT_GROUP + unit).to(tl.int64)
    blk = tl.load(UNIT_ROW + unit).to(tl.int64)
    beg = tl.load(UNIT_BEGIN + unit)
    end = tl.load(UNIT_END + unit)
    # Key sub-tile of the unit's block (grid axis 1): BKP <= BK columns per program keeps the
    # [TM, BKP] score tiles and the dk accumulator in registers.
    offs_n = tl.program_id(1).to(tl.int64) * BKP + tl.arange(0, BKP).to(tl.int64)
    k_rows = blk + offs_n
    k_ok = (offs_n < BK) & (k_rows < Tk)
    dk = tl.zeros([BKP, DIP], tl.float32)
    for e0 in range(beg, end, TM):
        idx = e0 + tl.arange(0, TM)
        ok = idx < end
        q_rows = tl.load(TOKENS + idx, mask=ok, other=-1).to(tl.int64)
        ok = ok & (q_rows >= 0)  # -1: unused slot or a token's repeated pick of the block
        qk_rows = tl.load(QK_ROWS + q_rows, mask=ok, other=-1).to(tl.int64)
        dk += _dk_tile(Q, K, LSE, QI, KI, LSES, PSUM, q_rows, ok, qk_rows, k_rows, k_ok, r, scale,
                       iscale, stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
                       stride_qit, stride_qih, stride_kit, stride_st, G, D, DP, DI, DIP, PRECISION)
    if end > beg:  # empty units of the upper-bound grid must not touch rows another unit owns
        _store_dk(DK, k_rows, k_ok, r, dk * iscale, stride_dkh, stride_dkt, DI, DIP, ATOMIC)


@triton.jit
def _kl_kv_student_max_kernel(
    QI, KI, QK_ROWS, TOKENS, UNIT_GROUP, UNIT_ROW, UNIT_BEGIN, UNIT_END, MX, Tk, iscale,
    stride_qit, stride_qih, stride_kit, stride_st,
    DI: tl.constexpr, DIP: tl.constexpr, TM: tl.constexpr, BK: tl.constexpr, BKP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Pass 1 of the KV-outer forward: per (group, query) max student logit, by fp32 atomic max."""
    unit = tl.program_id(0)
    r = tl.load(UNIT_GROUP + unit).to(tl.int64)
    blk = tl.load(UNIT_ROW + unit).to(tl.int64)
    beg = tl.load(UNIT_BEGIN + unit)
    end = tl.load(UNIT_END + unit)
    # Key sub-tile of the unit's block (grid axis 1): BKP <= BK columns per program keeps the
    # [TM, BKP] score tiles and the dk accumulator in registers.
    offs_n = tl.program_id(1).to(tl.int64) * BKP + tl.arange(0, BKP).to(tl.int64)
    k_rows = blk + offs_n
    k_ok = (offs_n < BK) & (k_rows < Tk)
    offs_e = tl.arange(0, DIP)
    e_ok = offs_e < DI
    ki = tl.load(KI + k_rows[:, None] * stride_kit + offs_e[None, :],
                 mask=k_ok[:, None] & e_ok[None, :], other=0.0)  # [BKP, DIP]
    for e0 in range(beg, end, TM):
        idx = e0 + tl.arange(0, TM)
        ok = idx < end
        q_rows = tl.load(TOKENS + idx, mask=ok, other=-1).to(tl.int64)
        ok = ok & (q_rows >= 0)  # -1: unused slot or a token's repeated pick of the block
        qk_rows = tl.load(QK_ROWS + q_rows, mask=ok, other=-1).to(tl.int64)
        qi = tl.load(QI + q_rows[:, None] * stride_qit + r * stride_qih + offs_e[None, :],
                     mask=ok[:, None] & e_ok[None, :], other=0.0)
        t = tl.dot(qi, tl.trans(ki), input_precision=PRECISION) * iscale
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
    """Pass 2 of the KV-outer forward: additive KL statistics per (group, query), by fp32 atomics.

    With the per-row max M from pass 1, sum exp(t - M), sum P, sum P log P and sum P t are plain sums
    over the row's blocks, so every (block, query) tile adds its share independently.
    """
    unit = tl.program_id(0)
    r = tl.load(UNIT_GROUP + unit).to(tl.int64)
    blk = tl.load(UNIT_ROW + unit).to(tl.int64)
    beg = tl.load(UNIT_BEGIN + unit)
    end = tl.load(UNIT_END + unit)
    # Key sub-tile of the unit's block (grid axis 1): BKP <= BK columns per program keeps the
    # [TM, BKP] score tiles and the dk accumulator in registers.
    offs_n = tl.program_id(1).to(tl.int64) * BKP + tl.arange(0, BKP).to(tl.int64)
    k_rows = blk + offs_n
    k_ok = (offs_n < BK) & (k_rows < Tk)
    for e0 in range(beg, end, TM):
        idx = e0 + tl.arange(0, TM)
        ok = idx < end
        q_rows = tl.load(TOKENS + idx, mask=ok, other=-1).to(tl.int64)
        ok = ok & (q_rows >= 0)  # -1: unused slot or a token's repeated pick of the block
        qk_rows = tl.load(QK_ROWS + q_rows, mask=ok, other=-1).to(tl.int64)
        p, t, qi, ki, mask = _teacher_student_tile(
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
    """KV-outer backward: dk_idx of the unit's block in registers, dq_idx rows by fp32 atomics."""
    unit = tl.program_id(0)
    r = tl.load(UNIT_GROUP + unit).to(tl.int64)
    blk = tl.load(UNIT_ROW + unit).to(tl.int64)
    beg = tl.load(UNIT_BEGIN + unit)
    end = tl.load(UNIT_END + unit)
    # Key sub-tile of the unit's block (grid axis 1): BKP <= BK columns per program keeps the
    # [TM, BKP] score tiles and the dk accumulator in registers.
    offs_n = tl.program_id(1).to(tl.int64) * BKP + tl.arange(0, BKP).to(tl.int64)
    k_rows = blk + offs_n
    k_ok = (offs_n < BK) & (k_rows < Tk)
    offs_e = tl.arange(0, DIP)
    e_ok = offs_e < DI
    dk = tl.zeros([BKP, DIP], tl.float32)
    for e0 in range(beg, end, TM):
        idx = e0 + tl.arange(0, TM)
        ok = idx < end
        q_rows = tl.load(TOKENS + idx, mask=ok, other=-1).to(tl.int64)
        ok = ok & (q_rows >= 0)  # -1: unused slot or a token's repeated pick of the block
        qk_rows = tl.load(QK_ROWS + q_rows, mask=ok, other=-1).to(tl.int64)
        p, t, qi, ki, mask = _teacher_student_tile(
            Q, K, LSE, QI, KI, q_rows, ok, qk_rows, k_rows, k_ok, r, scale, iscale,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
            stride_qit, stride_qih, stride_kit, G, D, DP, DI, DIP, PRECISION)
        lse_t = tl.load(LSES + r * stride_st + q_rows, mask=ok, other=0.0)
        psum = tl.load(PSUM + r * stride_st + q_rows, mask=ok, other=0.0)
        ds = (tl.exp(t - lse_t[:, None]) * psum[:, None] - p).to(qi.dtype)  # [TM, BKP]
        dk += tl.dot(tl.trans(ds), qi, input_precision=PRECISION)
        dq = tl.dot(ds, ki, input_precision=PRECISION) * iscale  # [TM, DIP]
        tl.atomic_add(DQ + q_rows[:, None] * stride_dqt + r * stride_dqh + offs_e[None, :], dq,
                      mask=ok[:, None] & e_ok[None, :])
    tl.atomic_add(DK + k_rows[:, None] * stride_dkt + offs_e[None, :], dk * iscale,
                  mask=k_ok[:, None] & e_ok[None, :] & (end > beg))


# ----------------------------------------------------------------------------------------------
# Dense warmup stage
# ----------------------------------------------------------------------------------------------
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
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
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
        p, t, qi, ki, mask = _teacher_student_tile(
            Q, K, LSE, QI, KI, q_rows, row_ok, qk_rows, k_rows, offs_n < k_len, r, scale, iscale,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
            stride_qit, stride_qih, stride_kit, G, D, DP, DI, DIP, PRECISION)
        m_i, l_i, psum, plogp, pt, acc_e, acc_p = _accumulate_row_stats(
            p, t, ki, mask, m_i, l_i, psum, plogp, pt, acc_e, acc_p, WANT_DQ, PRECISION)
    _finish_rows(KL, LSES, PSUM, DQ, q_rows, row_ok, r, stride_st, stride_dqt, stride_dqh,
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
        dk += _dk_tile(Q, K, LSE, QI, KI, LSES, PSUM, q_start + offs_m, ok, k_start + pos_off + offs_m,
                       k_rows, k_ok, r, scale, iscale,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
                       stride_qit, stride_qih, stride_kit, stride_st, G, D, DP, DI, DIP, PRECISION)
    _store_dk(DK, k_rows, k_ok, r, dk * iscale, stride_dkh, stride_dkt, DI, DIP, ATOMIC)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
def _interpreting(device) -> bool:
    return device.type != "cuda"


# Tile choices on Hopper (measurements in kernels/BENCHMARKS_index.md); scripts/gpu_check_index.py
# sweeps alternatives by editing this dict. The interpreter config keeps CPU tests small and fast.
# union_max_waste: the non-deterministic sparse KL takes the union-tile forward when it computes at most
# this many tile rows per useful (token, block) pick, else the all-KV-outer atomic path (0 = never).
CONFIG = dict(kv_tm=64, kv_bn=128, kv_chunk=256, kv_fwd_warps=4, kv_bwd_warps=8, stages=2,
              union_max_waste=2.0, qtile_tm=16, qtile_warps=4, dense_bm=64, dense_bn=64, dense_warps=4)
INTERPRET_CONFIG = dict(kv_tm=16, kv_bn=16, kv_chunk=8, kv_fwd_warps=4, kv_bwd_warps=4, stages=1,
                        union_max_waste=0.0, qtile_tm=16, qtile_warps=4, dense_bm=16, dense_bn=16,
                        dense_warps=4)


def _cfg(device) -> dict:
    return INTERPRET_CONFIG if _interpreting(device) else CONFIG


def _kv_key_tile(block_size: int, cfg: dict) -> int:
    """Key columns per KV-outer program (a power of two >= 16, at most the padded block)."""
    return min(pow2_at_least_16(block_size), max(16, int(cfg["kv_bn"])))


def _check_kernel_limits(q, k, q_idx, k_idx):
    t, hq, d = q.shape
    hkv = k.shape[1]
    di = q_idx.shape[2]
    if d > 256 or di > 256:
        raise ValueError(f"head dims must be <= 256 for the Triton KL kernels (D={d}, Di={di})")
    if q_idx.dtype != k_idx.dtype:
        raise TypeError(f"q_idx dtype {q_idx.dtype} must match k_idx dtype {k_idx.dtype}")
    if q.dtype != k.dtype:
        raise TypeError(f"q dtype {q.dtype} must match k dtype {k.dtype}")
    return t, hq, hkv, d, di, hq // hkv


def _strides(q, k, lse, q_idx, k_idx):
    return (q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0), lse.stride(1),
            q_idx.stride(0), q_idx.stride(1), k_idx.stride(0))


def _last_contig(*ts):
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def _frag_table(layout: VarlenLayout, device):
    rows = [[fr.q_start, fr.q_len, fr.k_start, fr.k_len] for fr in layout.fragments]
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 4).to(device)


def _norm(layout: VarlenLayout, hkv: int, reduction: str) -> float:
    return 1.0 if reduction == "sum" else 1.0 / max(1, layout.total_q * hkv)


def _dk_buffer(k_idx, hkv: int, deterministic: bool):
    """fp32 dk accumulator: [1, Tk, Di] for atomics, [Hkv, Tk, Di] (summed after) when deterministic."""
    groups = hkv if deterministic else 1
    return torch.zeros((groups, k_idx.shape[0], k_idx.shape[1]), dtype=torch.float32, device=k_idx.device)


def _union_schedule(topk_idx, layout, block_size, device):
    """(blk_rows [Hkv, T, K], Q-tile union schedule) of the union-tile forward."""
    blk_rows = block_key_rows(topk_idx, layout, block_size)  # [Hkv, T, K] int64
    return blk_rows, build_q_tiles(blk_rows, _cfg(device)["qtile_tm"])


def _union_waste(blk_rows, sched) -> float:
    """Tile rows the union forward computes per useful (token, block) pick (1 = no waste; one sync)."""
    union, picks = torch.stack([sched.counts.sum(dtype=torch.int64), (blk_rows >= 0).sum()]).tolist()
    return union * sched.tokens_per_tile / max(1, picks)


def union_schedule_or_none(topk_idx, layout, block_size, device, deterministic: bool,
                           max_waste: Optional[float] = None):
    """The union-tile schedule when the KL takes the union forward, else None (all-KV-outer path).

    Neighbouring tokens that share blocks (local + shared long-range patterns) make the union
    forward nearly waste-free and spare the backward its dq_idx atomics; near-random selections blow
    the union up (~16x), so those take the all-KV-outer path. The deterministic mode always takes
    the union forward (no atomics)."""
    if deterministic:
        return _union_schedule(topk_idx, layout, block_size, device)
    max_waste = _cfg(device)["union_max_waste"] if max_waste is None else max_waste
    if max_waste <= 0:
        return None
    schedule = _union_schedule(topk_idx, layout, block_size, device)
    return schedule if _union_waste(*schedule) <= max_waste else None


def _sparse_forward(q, k, lse, q_idx, k_idx, topk_idx, layout, block_size, scale, iscale, want_dq,
                    schedule=None):
    t, hq, hkv, d, di, g = _check_kernel_limits(q, k, q_idx, k_idx)
    dev = q.device
    cfg = _cfg(dev)
    blk_rows, sched = schedule if schedule is not None else _union_schedule(topk_idx, layout, block_size, dev)
    tm = sched.tokens_per_tile
    qk_rows = query_key_rows(layout)  # [T] int32
    kl = torch.empty((hkv, t), dtype=torch.float32, device=dev)
    lses = torch.empty_like(kl)
    psum = torch.empty_like(kl)
    dq = torch.empty((t, hkv, di), dtype=torch.float32, device=dev) if want_dq else kl
    if t == 0:
        return kl, lses, psum, dq, qk_rows, blk_rows
    bkp = pow2_at_least_16(block_size)
    prec = dot_precision(q.dtype)
    _kl_sparse_fwd_kernel[(sched.num_tiles, hkv)](
        q, k, lse, q_idx, k_idx, sched.block_rows, sched.token_masks, sched.counts, qk_rows,
        kl, lses, psum, dq, t, k.shape[0], scale, iscale,
        *_strides(q, k, lse, q_idx, k_idx), kl.stride(0),
        dq.stride(0) if want_dq else 0, dq.stride(1) if want_dq else 0,
        sched.block_rows.stride(0), sched.block_rows.stride(1), sched.counts.stride(0),
        G=g, D=d, DP=pow2_at_least_16(d), DI=di, DIP=pow2_at_least_16(di), TM=tm, BK=block_size,
        BKP=bkp, WANT_DQ=want_dq, PRECISION=prec, num_warps=cfg["qtile_warps"],
        num_stages=cfg["stages"],
    )
    return kl, lses, psum, dq, qk_rows, blk_rows


def _sparse_dk(q, k, lse, q_idx, k_idx, lses, psum, qk_rows, blk_rows, layout, block_size, scale, iscale,
               deterministic):
    t, hq, hkv, d, di, g = _check_kernel_limits(q, k, q_idx, k_idx)
    cfg = _cfg(q.device)
    chunk = 0 if deterministic else cfg["kv_chunk"]
    units = build_kv_units(blk_rows, chunk, k.shape[0], layout.total_blocks(block_size))
    dk = _dk_buffer(k_idx, hkv, deterministic)
    if units.num_units == 0:
        return dk.sum(0)
    tm = cfg["kv_tm"]
    bn = _kv_key_tile(block_size, cfg)
    _kl_sparse_dk_kernel[(units.num_units, triton.cdiv(block_size, bn))](
        q, k, lse, q_idx, k_idx, lses, psum, qk_rows,
        units.tokens, units.unit_group, units.unit_block_row, units.unit_begin, units.unit_end,
        dk, k.shape[0], scale, iscale,
        *_strides(q, k, lse, q_idx, k_idx), lses.stride(0),
        dk.stride(0) if deterministic else 0, dk.stride(1),
        G=g, D=d, DP=pow2_at_least_16(d), DI=di, DIP=pow2_at_least_16(di), TM=tm, BK=block_size,
        BKP=bn, ATOMIC=not deterministic, PRECISION=dot_precision(q.dtype),
        num_warps=cfg["kv_bwd_warps"], num_stages=cfg["stages"],
    )
    return dk.sum(0)


def _kv_units(topk_idx, layout, block_size, chunk):
    blk_rows = block_key_rows(topk_idx, layout, block_size)  # [Hkv, T, K] int64
    units = build_kv_units(blk_rows, chunk, layout.total_k, layout.total_blocks(block_size))
    return units, query_key_rows(layout)


def _kv_forward(q, k, lse, q_idx, k_idx, units, qk_rows, block_size, scale, iscale):
    """Atomic KV-outer forward: per (group, query) KL, student LSE and teacher mass [Hkv, T]."""
    t, hq, hkv, d, di, g = _check_kernel_limits(q, k, q_idx, k_idx)
    dev = q.device
    mx = torch.full((hkv, t), float("-inf"), dtype=torch.float32, device=dev)
    stats = torch.zeros((4, hkv, t), dtype=torch.float32, device=dev)  # l, psum, plogp, pt
    if units.num_units:
        cfg = _cfg(dev)
        bn = _kv_key_tile(block_size, cfg)
        grid = (units.num_units, triton.cdiv(block_size, bn))
        common = dict(DI=di, DIP=pow2_at_least_16(di), TM=cfg["kv_tm"], BK=block_size, BKP=bn,
                      PRECISION=dot_precision(q.dtype), num_warps=cfg["kv_fwd_warps"],
                      num_stages=cfg["stages"])
        sched = (units.tokens, units.unit_group, units.unit_block_row, units.unit_begin, units.unit_end)
        _kl_kv_student_max_kernel[grid](
            q_idx, k_idx, qk_rows, *sched, mx, k.shape[0], iscale,
            q_idx.stride(0), q_idx.stride(1), k_idx.stride(0), mx.stride(0), **common)
        _kl_kv_fwd_kernel[grid](
            q, k, lse, q_idx, k_idx, qk_rows, *sched, mx, stats[0], stats[1], stats[2], stats[3],
            k.shape[0], scale, iscale, *_strides(q, k, lse, q_idx, k_idx), mx.stride(0),
            G=g, D=d, DP=pow2_at_least_16(d), **common)
    l, psum, plogp, pt = stats.unbind(0)
    has = l > 0
    lses = torch.where(has, mx + torch.log(torch.where(has, l, torch.ones_like(l))), torch.zeros_like(l))
    kl = plogp - pt + lses * psum
    return kl, lses.contiguous(), psum.contiguous()


def _kv_backward(q, k, lse, q_idx, k_idx, lses, psum, units, qk_rows, block_size, scale, iscale):
    t, hq, hkv, d, di, g = _check_kernel_limits(q, k, q_idx, k_idx)
    dq = torch.zeros((t, hkv, di), dtype=torch.float32, device=q.device)
    dk = torch.zeros((k_idx.shape[0], di), dtype=torch.float32, device=q.device)
    if units.num_units:
        cfg = _cfg(q.device)
        bn = _kv_key_tile(block_size, cfg)
        _kl_kv_bwd_kernel[(units.num_units, triton.cdiv(block_size, bn))](
            q, k, lse, q_idx, k_idx, lses, psum, qk_rows, units.tokens, units.unit_group,
            units.unit_block_row, units.unit_begin, units.unit_end, dq, dk, k.shape[0], scale, iscale,
            *_strides(q, k, lse, q_idx, k_idx), lses.stride(0), dq.stride(0), dq.stride(1), dk.stride(0),
            G=g, D=d, DP=pow2_at_least_16(d), DI=di, DIP=pow2_at_least_16(di), TM=cfg["kv_tm"],
            BK=block_size, BKP=bn, PRECISION=dot_precision(q.dtype),
            num_warps=cfg["kv_bwd_warps"], num_stages=cfg["stages"])
    return dq, dk


class _IndexerKLTritonAtomic(torch.autograd.Function):
    """Default mode: KV-outer forward and backward (fp32 atomics; no per-query eager buffers)."""

    @staticmethod
    def forward(ctx, q, k, lse, q_idx, k_idx, topk_idx, layout, block_size, scale, iscale, reduction):
        chunk = _cfg(q.device)["kv_chunk"]
        units, qk_rows = _kv_units(topk_idx, layout, block_size, chunk)
        kl, lses, psum = _kv_forward(q, k, lse, q_idx, k_idx, units, qk_rows, block_size, scale, iscale)
        norm = _norm(layout, k.shape[1], reduction)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            ctx.save_for_backward(q, k, lse, q_idx, k_idx, lses, psum, qk_rows)
            ctx.units = units
            ctx.args = (block_size, scale, iscale, norm)
        return (kl.sum(dtype=torch.float64) * norm).to(torch.float32)

    @staticmethod
    def backward(ctx, grad):
        q, k, lse, q_idx, k_idx, lses, psum, qk_rows = ctx.saved_tensors
        block_size, scale, iscale, norm = ctx.args
        dq, dk = _kv_backward(q, k, lse, q_idx, k_idx, lses, psum, ctx.units, qk_rows, block_size,
                              scale, iscale)
        coef = grad.float() * norm
        dq_idx = (dq * coef).to(q_idx.dtype) if ctx.needs_input_grad[3] else None
        dk_idx = (dk * coef).to(k_idx.dtype) if ctx.needs_input_grad[4] else None
        return None, None, None, dq_idx, dk_idx, None, None, None, None, None, None


class _IndexerKLTriton(torch.autograd.Function):
    """Union-tile Q-outer forward (eager dq_idx, no atomics) + KV-outer dk_idx pass: fp32 atomics over
    chunked units, or (deterministic) one unit per (group, block) into per-group buffers."""

    @staticmethod
    def forward(ctx, q, k, lse, q_idx, k_idx, topk_idx, layout, block_size, scale, iscale, reduction,
                deterministic, schedule):
        want = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        kl, lses, psum, dq, qk_rows, blk_rows = _sparse_forward(
            q, k, lse, q_idx, k_idx, topk_idx, layout, block_size, scale, iscale, want, schedule)
        norm = _norm(layout, k.shape[1], reduction)
        if want:
            ctx.save_for_backward(q, k, lse, q_idx, k_idx, lses, psum, dq, qk_rows, blk_rows)
            ctx.args = (layout, block_size, scale, iscale, norm, deterministic)
        return (kl.sum(dtype=torch.float64) * norm).to(torch.float32)

    @staticmethod
    def backward(ctx, grad):
        q, k, lse, q_idx, k_idx, lses, psum, dq, qk_rows, blk_rows = ctx.saved_tensors
        layout, block_size, scale, iscale, norm, deterministic = ctx.args
        coef = grad.float() * norm
        dq_idx = (dq * coef).to(q_idx.dtype) if ctx.needs_input_grad[3] else None
        dk_idx = None
        if ctx.needs_input_grad[4]:
            dk = _sparse_dk(q, k, lse, q_idx, k_idx, lses, psum, qk_rows, blk_rows, layout, block_size,
                            scale, iscale, deterministic)
            dk_idx = (dk * coef).to(k_idx.dtype)
        return None, None, None, dq_idx, dk_idx, None, None, None, None, None, None, None, None


def indexer_kl_triton(q, k, lse, q_idx, k_idx, topk_idx, layout: VarlenLayout, *, block_size: int,
                      scale: float, index_scale: float, reduction: str = "mean",
                      deterministic: bool = False) -> torch.Tensor:
    """Sparse-stage KL(P || Q) on the selected support -> fp32 scalar; grads to q_idx, k_idx only."""
    if block_size > 256:
        raise ValueError(f"block_size={block_size} exceeds the Triton KL tile (<= 256)")
    q, k, q_idx, k_idx = _last_contig(q.detach(), k.detach(), q_idx, k_idx)
    lse = lse.detach().float()
    schedule = union_schedule_or_none(topk_idx, layout, block_size, q.device, deterministic)
    if schedule is None:
        return _IndexerKLTritonAtomic.apply(q, k, lse, q_idx, k_idx, topk_idx, layout, block_size,
                                            float(scale), float(index_scale), reduction)
    return _IndexerKLTriton.apply(q, k, lse, q_idx, k_idx, topk_idx, layout, block_size, float(scale),
                                  float(index_scale), reduction, bool(deterministic), schedule)


def _dense_lse(q, k, layout, scale, frag, tile_frag, tile_m0, bm, bn):
    t, hq, d = q.shape
    g = hq // k.shape[1]
    lse = torch.empty((t, hq), dtype=torch.float32, device=q.device)
    if tile_frag.numel():
        _dense_lse_kernel[(tile_frag.numel(), hq)](
            q, k, lse, tile_frag, tile_m0, frag, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0), lse.stride(1),
            G=g, D=d, DP=pow2_at_least_16(d), BM=bm, BN=bn, PRECISION=dot_precision(q.dtype),
            num_warps=_cfg(q.device)["dense_warps"], num_stages=_cfg(q.device)["stages"])
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
    def forward(ctx, q, k, lse, q_idx, k_idx, layout, scale, iscale, reduction, deterministic):
        t, hq, hkv, d, di, g = _check_kernel_limits(q, k, q_idx, k_idx)
        dev = q.device
        cfg = _cfg(dev)
        bm, bn = cfg["dense_bm"], cfg["dense_bn"]
        frag = _frag_table(layout, dev)
        tile_frag, tile_m0 = query_tile_table(layout, bm, dev)
        if lse is None:
            lse = _dense_lse(q, k, layout, scale, frag, tile_frag, tile_m0, bm, bn)
        want = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        kl = torch.empty((hkv, t), dtype=torch.float32, device=dev)
        lses = torch.empty_like(kl)
        psum = torch.empty_like(kl)
        dq = torch.empty((t, hkv, di), dtype=torch.float32, device=dev) if want else kl
        if tile_frag.numel():
            _kl_dense_fwd_kernel[(tile_frag.numel(), hkv)](
                q, k, lse, q_idx, k_idx, tile_frag, tile_m0, frag, kl, lses, psum, dq, scale, iscale,
                *_strides(q, k, lse, q_idx, k_idx), kl.stride(0),
                dq.stride(0) if want else 0, dq.stride(1) if want else 0,
                G=g, D=d, DP=pow2_at_least_16(d), DI=di, DIP=pow2_at_least_16(di), BM=bm, BN=bn,
                WANT_DQ=want, PRECISION=dot_precision(q.dtype), num_warps=cfg["dense_warps"],
                num_stages=cfg["stages"])
        norm = _norm(layout, hkv, reduction)
        if want:
            ctx.save_for_backward(q, k, lse, q_idx, k_idx, lses, psum, dq, frag)
            ctx.args = (layout, scale, iscale, norm, deterministic, bm, bn)
        return (kl.sum(dtype=torch.float64) * norm).to(torch.float32)

    @staticmethod
    def backward(ctx, grad):
        q, k, lse, q_idx, k_idx, lses, psum, dq, frag = ctx.saved_tensors
        layout, scale, iscale, norm, deterministic, bm, bn = ctx.args
        t, hq, hkv, d, di, g = _check_kernel_limits(q, k, q_idx, k_idx)
        coef = grad.float() * norm
        dq_idx = (dq * coef).to(q_idx.dtype) if ctx.needs_input_grad[3] else None
        dk_idx = None
        if ctx.needs_input_grad[4]:
            dk = _dk_buffer(k_idx, hkv, deterministic)
            for ktf, ktn in _key_tile_rounds(layout, bn, q.device):
                _kl_dense_dk_kernel[(ktf.numel(), hkv)](
                    q, k, lse, q_idx, k_idx, lses, psum, ktf, ktn, frag, dk, scale, iscale,
                    *_strides(q, k, lse, q_idx, k_idx), lses.stride(0),
                    dk.stride(0) if deterministic else 0, dk.stride(1),
                    G=g, D=d, DP=pow2_at_least_16(d), DI=di, DIP=pow2_at_least_16(di), BM=bm, BN=bn,
                    ATOMIC=not deterministic, PRECISION=dot_precision(q.dtype),
                    num_warps=_cfg(q.device)["dense_warps"], num_stages=_cfg(q.device)["stages"])
            dk_idx = (dk.sum(0) * coef).to(k_idx.dtype)
        return None, None, None, dq_idx, dk_idx, None, None, None, None, None


def indexer_kl_dense_triton(q, k, q_idx, k_idx, layout: VarlenLayout, *, scale: float,
                            index_scale: float, lse: Optional[torch.Tensor] = None,
                            reduction: str = "mean", deterministic: bool = False) -> torch.Tensor:
    """Warmup-stage KL over the full causal context -> fp32 scalar; grads to q_idx, k_idx only."""
    q, k, q_idx, k_idx = _last_contig(q.detach(), k.detach(), q_idx, k_idx)
    if lse is not None:
        lse = lse.detach().float()
    return _IndexerKLDenseTriton.apply(q, k, lse, q_idx, k_idx, layout, float(scale),
                                       float(index_scale), reduction, bool(deterministic))
