"""Pieces shared by the indexer-KL Triton kernels (union.py, kv_outer.py, dense.py).

Math, per (query i, group r) over the support S(i, r):
  teacher P_j = mean_h exp(q_ih . k_jr * scale - lse_ih)        (detached, recomputed from q, k, lse)
  student t_j = q_idx_ir . k_idx_j * index_scale, Q = softmax_S(t)
  KL = sum_j P log P - sum_j P t + lse_t * sum_j P               (one pass: no dependence on lse_t)
  dKL/dt_j = Q_j * sum P - P_j
so dq_idx_i = index_scale * (sumP * (sum_j e^{t_j - m} k_idx_j) / l - sum_j P_j k_idx_j).

Every inner step is one tile: a set of query rows x one key tile, the G heads of the group looped so a
K tile is reused by the rows and the G heads. The jit helpers below are that tile (teacher + student),
the per-row statistics, the dk_idx contribution, and the KV-unit prologue / step of the KV-outer
passes (a program owns key sub-tile ``program_id(1)`` of one unit's block, and steps over the unit's
queries TM at a time).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_compat import ensure_interpreter_compat
from ..layout import VarlenLayout
from ..triton_utils import dot, pow2_at_least_16

__all__ = ["teacher_student_tile", "accumulate_row_stats", "finish_rows", "dk_tile", "store_dk", "kv_unit",
           "kv_step_rows", "check_kernel_limits", "strides", "norm", "dk_buffer", "kv_key_tile"]

ensure_interpreter_compat()


@triton.jit
def teacher_student_tile(
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
    # reshape-sum for the head mean measured 3x slower on H200.)
    p = tl.zeros(mask.shape, tl.float32)
    for h in range(G):
        head = r * G + h
        qh = tl.load(Q + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                     mask=q_ok[:, None] & d_ok[None, :], other=0.0)  # [M, DP]
        s = dot(qh, tl.trans(k), PRECISION) * scale  # [M, N]
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
    t = dot(qi, tl.trans(ki), PRECISION) * iscale
    t = tl.where(mask, t, float("-inf"))
    return p, t, qi, ki, mask


@triton.jit
def accumulate_row_stats(p, t, ki, mask, m_i, l_i, psum, plogp, pt, acc_e, acc_p,
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
        acc_e = acc_e * alpha[:, None] + dot(e.to(ki.dtype), ki, PRECISION)
        acc_p += dot(p.to(ki.dtype), ki, PRECISION)
    return m_new, l_i, psum, plogp, pt, acc_e, acc_p


@triton.jit
def finish_rows(KL, LSES, PSUM, DQ, q_rows, q_ok, r, stride_st, stride_dqt, stride_dqh,
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
def dk_tile(Q, K, LSE, QI, KI, LSES, PSUM, q_rows, q_ok, qk_rows, k_rows, k_ok, r, scale, iscale,
             stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
             stride_qit, stride_qih, stride_kit, stride_st,
             G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
             PRECISION: tl.constexpr):
    """Contribution [N, DIP] of one (query rows x key rows) tile to dk_idx (before index_scale)."""
    p, t, qi, ki, mask = teacher_student_tile(
        Q, K, LSE, QI, KI, q_rows, q_ok, qk_rows, k_rows, k_ok, r, scale, iscale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
        stride_qit, stride_qih, stride_kit, G, D, DP, DI, DIP, PRECISION)
    lse_t = tl.load(LSES + r * stride_st + q_rows, mask=q_ok, other=0.0)
    psum = tl.load(PSUM + r * stride_st + q_rows, mask=q_ok, other=0.0)
    qprob = tl.exp(t - lse_t[:, None])  # 0 off support (t = -inf)
    ds = qprob * psum[:, None] - p  # [M, N] d KL / d t
    return dot(tl.trans(ds.to(qi.dtype)), qi, PRECISION)


@triton.jit
def store_dk(DK, k_rows, k_ok, r, dk, stride_dkh, stride_dkt,
              DI: tl.constexpr, DIP: tl.constexpr, ATOMIC: tl.constexpr):
    offs_e = tl.arange(0, DIP)
    ptrs = DK + r * stride_dkh + k_rows[:, None] * stride_dkt + offs_e[None, :]
    msk = k_ok[:, None] & (offs_e < DI)[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, dk, mask=msk)
    else:
        # Deterministic mode: one program owns these rows of group r's buffer in this launch.
        tl.store(ptrs, tl.load(ptrs, mask=msk, other=0.0) + dk, mask=msk)


@triton.jit
def kv_unit(UNIT_GROUP, UNIT_ROW, UNIT_BEGIN, UNIT_END, Tk, BK: tl.constexpr, BKP: tl.constexpr):
    """Prologue of a KV-outer program: (group r, key rows [BKP], valid key rows, entry range [beg, end)).

    Key sub-tile of the unit's block = grid axis 1: BKP <= BK columns per program keeps the [TM, BKP]
    score tiles and the dk accumulator in registers."""
    unit = tl.program_id(0)
    r = tl.load(UNIT_GROUP + unit).to(tl.int64)
    blk = tl.load(UNIT_ROW + unit).to(tl.int64)
    beg = tl.load(UNIT_BEGIN + unit)
    end = tl.load(UNIT_END + unit)
    offs_n = tl.program_id(1).to(tl.int64) * BKP + tl.arange(0, BKP).to(tl.int64)
    k_rows = blk + offs_n
    k_ok = (offs_n < BK) & (k_rows < Tk)
    return r, k_rows, k_ok, beg, end


@triton.jit
def kv_step_rows(TOKENS, QK_ROWS, e0, end, TM: tl.constexpr):
    """Query rows [TM] of one KV-outer step (entries [e0, e0 + TM) of the unit), their validity and the
    key row of each query's own position."""
    idx = e0 + tl.arange(0, TM)
    ok = idx < end
    q_rows = tl.load(TOKENS + idx, mask=ok, other=-1).to(tl.int64)
    ok = ok & (q_rows >= 0)  # -1: unused slot or a token's repeated pick of the block
    qk_rows = tl.load(QK_ROWS + q_rows, mask=ok, other=-1).to(tl.int64)
    return q_rows, ok, qk_rows


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
def check_kernel_limits(q, k, q_idx, k_idx):
    """(T, Hq, Hkv, D, Di, G) after checking the Triton KL kernels' limits."""
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


def strides(q, k, lse, q_idx, k_idx):
    """The stride arguments every KL kernel takes, in its parameter order."""
    return (q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0), lse.stride(1),
            q_idx.stride(0), q_idx.stride(1), k_idx.stride(0))


def norm(layout: VarlenLayout, hkv: int, reduction: str) -> float:
    """Factor from the (token, group) sum to the reduction ("mean" divides by T * Hkv)."""
    return 1.0 if reduction == "sum" else 1.0 / max(1, layout.total_q * hkv)


def dk_buffer(k_idx, hkv: int, deterministic: bool):
    """fp32 dk accumulator: [1, Tk, Di] for atomics, [Hkv, Tk, Di] (summed after) when deterministic."""
    groups = hkv if deterministic else 1
    return torch.zeros((groups, k_idx.shape[0], k_idx.shape[1]), dtype=torch.float32, device=k_idx.device)


def kv_key_tile(block_size: int, kv_bn: int) -> int:
    """Key columns per KV-outer program (a power of two >= 16, at most the padded block)."""
    return min(pow2_at_least_16(block_size), max(16, int(kv_bn)))
