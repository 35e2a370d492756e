"""Sparse attention backward (Triton); the autograd entry lives in triton_fwd.py.

Backward plan:
1. delta = rowsum(dO * O) - dLSE per (token, head), fp32 (dLSE lets the lse output carry gradients).
2. KV-outer pass: a program owns BLOCK_N key rows of one selected block for one KV group, and the
   queries that picked the block (reverse CSR from ``triton_common.build_kv_units``). It recomputes
   P from the stored LSE, keeps dK/dV in registers over all its queries and adds them once into fp32
   buffers (a block's units only collide when it was cut into several chunks).
3. dQ either scattered from the KV pass with fp32 atomics (order-nondeterministic) or computed by a
   separate Q-outer pass over the forward's union tiles (no atomics; faster while neighbouring
   tokens share blocks): ``dq_mode`` picks per call.
4. Deterministic mode: one unit per (group, block) (so every dK/dV element gets a single add onto
   zero) and the Q-outer dQ pass.
5. Fused indexer-KL key gradient (``kl`` argument, msa_kernels.kl.fused): the KV pass already holds
   every head's probability p of its (key, query) pairs, i.e. the KL teacher. Per step it adds the
   student logits t = q_idx . k_idx * index_scale of the step's TOKENS ([BLOCK_N, 16] token slots,
   one MMA of Di), the teacher's head sum from the bf16 P^T tile of the dV product times a 0/1
   [M, 16] token-selection matrix (one MMA), and dk_idx += dS_kl^T q_idx with
   dS_kl = Q * psum - mean_g p (student LSE and teacher mass from the KL forward). Student work runs
   once per token, not per head row, so this pays off for every group size
   (docs/experiments/2026-11-26_index_branch_kernels.md, item 13) and saves the separate KL key
   pass that recomputed the teacher.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_common import (LOG2E, BwdConfig, QTileSchedule, build_kv_units, check_shapes, dot_mode,
                            mma, next_pow2)

__all__ = ["sparse_attention_bwd", "dq_mode", "KLKeyGrad"]


@dataclass
class KLKeyGrad:
    """Inputs of the fused indexer-KL key gradient (see 5. above). lses / psum: [Hkv, T] fp32 student
    LSE (natural log) and teacher mass on each (group, token)'s support, from the KL forward."""

    q_idx: torch.Tensor  # [T, Hkv, Di], q's dtype
    k_idx: torch.Tensor  # [Tk, Di]
    lses: torch.Tensor
    psum: torch.Tensor
    index_scale: float


@triton.jit
def _delta_kernel(O, DO, DLSE, DELTA, ROWS, HAS_DLSE: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < ROWS
    d = tl.arange(0, D)
    off = rows.to(tl.int64)[:, None] * D + d[None, :]
    o = tl.load(O + off, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=ok[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + rows, mask=ok, other=0.0)
    tl.store(DELTA + rows, delta, mask=ok)


@triton.jit
def _sparse_bwd_kv_kernel(
    Q, K, V, DO, LSE, DELTA, DQ32, DK32, DV32,  # DQ32 [T, HQ, D], DK32/DV32 [Tk, HKV, D] fp32
    TOKENS, UNIT_GROUP, UNIT_ROW, UNIT_BEGIN, UNIT_END, QK_ROW,
    TK, sm_scale, qk_scale,
    QI, KI, LSES, PSUM, DKI32,  # KL: q_idx [T, HKV, DI], k_idx [Tk, DI], lses/psum [HKV, T], DKI32 fp32
    T, stride_dkih, iscale2,  # DKI32 group stride (0: one shared [Tk, DI] buffer); iscale * log2(e)
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    TM: tl.constexpr, BLOCK_N: tl.constexpr, WRITE_DQ: tl.constexpr, DOT_MODE: tl.constexpr,
    WITH_KL: tl.constexpr, DI: tl.constexpr, TMK: tl.constexpr,
):
    unit = tl.program_id(0)
    sub = tl.program_id(1)
    M: tl.constexpr = TM * GP
    r = tl.load(UNIT_GROUP + unit)
    k_row = tl.load(UNIT_ROW + unit) + sub * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    begin = tl.load(UNIT_BEGIN + unit)
    end = tl.load(UNIT_END + unit)
    d = tl.arange(0, D)
    k_ok = k_row < TK
    kv_off = (k_row.to(tl.int64) * HKV + r) * D
    k = tl.load(K + kv_off[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)  # [BLOCK_N, D]
    v = tl.load(V + kv_off[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    rows = tl.arange(0, M)
    tm = rows // GP
    g = rows % GP
    head = r * G + g
    if WITH_KL:
        e = tl.arange(0, DI)
        ki = tl.load(KI + k_row.to(tl.int64)[:, None] * DI + e[None, :], mask=k_ok[:, None], other=0.0)
        dki = tl.zeros([BLOCK_N, DI], dtype=tl.float32)
        tcol = tl.arange(0, TMK)  # token slots of a step, padded to an MMA width
        # [M, TMK] 0/1: column i sums the head rows of token slot i (P^T @ sel = G x head mean).
        # via fp32: the CPU interpreter casts bool -> bf16 as raw bits (1 -> 9e-41)
        sel = ((tm[:, None] == tcol[None, :]) & (g < G)[:, None]).to(tl.float32).to(Q.dtype.element_ty)
    for start in range(begin, end, TM):
        idx = start + tm
        tok = tl.load(TOKENS + idx, mask=idx < end, other=-1)  # -1: padding / repeated pick
        row_ok = (tok >= 0) & (g < G)
        qk_row = tl.load(QK_ROW + tok, mask=row_ok, other=-1)
        q_off = (tok.to(tl.int64) * HQ + head) * D  # [M]
        q = tl.load(Q + q_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)  # [M, D]
        do = tl.load(DO + q_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
        lse_off = tok.to(tl.int64) * HQ + head
        lse = tl.load(LSE + lse_off, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + lse_off, mask=row_ok, other=0.0)
        # Transposed form (scores as [BLOCK_N, M]): the P^T / dS^T operands of the dV / dK products
        # stay in registers instead of going through a shared-memory transpose.
        s_t = mma(k, tl.trans(q), DOT_MODE) * qk_scale  # [BLOCK_N, M], log2 units
        visible = row_ok[None, :] & (k_row[:, None] <= qk_row[None, :])
        p_t = tl.where(visible, tl.math.exp2(s_t - lse[None, :]), 0.0)
        pb_t = p_t.to(do.dtype)
        dv += mma(pb_t, do, DOT_MODE)  # [BLOCK_N, D]
        dp_t = mma(v, tl.trans(do), DOT_MODE)  # [BLOCK_N, M]
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk += mma(ds_t, q, DOT_MODE)
        if WRITE_DQ:
            dq = mma(tl.trans(ds_t), k, DOT_MODE) * sm_scale  # [M, D]
            tl.atomic_add(DQ32 + q_off[:, None] + d[None, :], dq, mask=row_ok[:, None], sem="relaxed")
        if WITH_KL:
            # Student once per token (not per head row): logits [BLOCK_N, TMK] of the step's tokens,
            # teacher = head sum of P^T by the selection MMA.
            tidx = start + tcol
            ttok = tl.load(TOKENS + tidx, mask=(tcol < TM) & (tidx < end), other=-1)
            t_ok = ttok >= 0
            tqk = tl.load(QK_ROW + ttok, mask=t_ok, other=-1)
            qi = tl.load(QI + ((ttok.to(tl.int64) * HKV + r) * DI)[:, None] + e[None, :],
                         mask=t_ok[:, None], other=0.0)  # [TMK, DI]
            st_off = r.to(tl.int64) * T + ttok
            lses = tl.load(LSES + st_off, mask=t_ok, other=0.0) * 1.4426950408889634
            psum = tl.load(PSUM + st_off, mask=t_ok, other=0.0)
            t_t = mma(ki, tl.trans(qi), DOT_MODE) * iscale2  # [BLOCK_N, TMK], log2 units
            t_vis = t_ok[None, :] & (k_row[:, None] <= tqk[None, :])
            q_t = tl.where(t_vis, tl.math.exp2(t_t - lses[None, :]), 0.0)
            psum_g = psum * G
            ds_kl = (q_t * psum_g[None, :] - mma(pb_t, sel, DOT_MODE)).to(qi.dtype)  # G x dKL/dt
            dki += mma(ds_kl, qi, DOT_MODE)
    out_ok = k_ok & (end > begin)  # empty units of the over-sized grid add nothing
    tl.atomic_add(DK32 + kv_off[:, None] + d[None, :], dk * sm_scale, mask=out_ok[:, None], sem="relaxed")
    tl.atomic_add(DV32 + kv_off[:, None] + d[None, :], dv, mask=out_ok[:, None], sem="relaxed")
    if WITH_KL:
        tl.atomic_add(DKI32 + r * stride_dkih + k_row.to(tl.int64)[:, None] * DI + e[None, :], dki,
                      mask=out_ok[:, None], sem="relaxed")


@triton.jit
def _sparse_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    TILE_BLOCKS, TILE_MASKS, TILE_COUNTS, QK_ROW,
    T, TK, NUM_TILES, STRIDE, sm_scale, qk_scale,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    TM: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_N: tl.constexpr, DOT_MODE: tl.constexpr,
):
    """Deterministic dQ: Q-outer over the forward's union schedule, no atomics."""
    tile = tl.program_id(0)
    r = tl.program_id(1)
    M: tl.constexpr = TM * GP
    NSUB: tl.constexpr = BLOCK_KV // BLOCK_N
    rows = tl.arange(0, M)
    tm = rows // GP
    g = rows % GP
    tok = tile * TM + tm
    row_ok = (tok < T) & (g < G)
    head = r * G + g
    qk_row = tl.load(QK_ROW + tok, mask=row_ok, other=-1)
    d = tl.arange(0, D)
    q_off = (tok.to(tl.int64) * HQ + head) * D
    q = tl.load(Q + q_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + q_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
    lse_off = tok.to(tl.int64) * HQ + head
    lse = tl.load(LSE + lse_off, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + lse_off, mask=row_ok, other=0.0)
    dq = tl.zeros([M, D], dtype=tl.float32)
    sched = (r * NUM_TILES + tile).to(tl.int64)
    n_union = tl.load(TILE_COUNTS + sched)
    sched_off = sched * STRIDE
    n_cols = tl.arange(0, BLOCK_N)
    for it in range(0, n_union * NSUB):
        u = it // NSUB
        sub = it % NSUB
        blk_row = tl.load(TILE_BLOCKS + sched_off + u)
        bits = tl.load(TILE_MASKS + sched_off + u)
        picked = ((bits >> tm.to(tl.int64)) & 1) != 0
        k_row = blk_row + sub * BLOCK_N + n_cols
        kv_off = (k_row.to(tl.int64) * HKV + r) * D
        k_ok = k_row < TK
        k = tl.load(K + kv_off[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)
        v = tl.load(V + kv_off[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)
        s = mma(q, tl.trans(k), DOT_MODE) * qk_scale
        visible = (picked & row_ok)[:, None] & (k_row[None, :] <= qk_row[:, None])
        p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = mma(do, tl.trans(v), DOT_MODE)
        ds = p * (dp - delta[:, None])
        dq += mma(ds.to(k.dtype), k, DOT_MODE)
    tl.store(DQ + q_off[:, None] + d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


def dq_mode(bcfg: BwdConfig, tiles: QTileSchedule, blk_rows: torch.Tensor) -> str:
    """Resolve "auto": the Q-outer pass re-reads K/V once per union block of a tile, so it wins while
    neighbouring tokens share their blocks and loses to atomics when they do not (random patterns)."""
    if bcfg.dq_mode != "auto":
        return bcfg.dq_mode
    union, picks = torch.stack([tiles.counts.sum(dtype=torch.int64), (blk_rows >= 0).sum()]).tolist()  # one sync
    if picks == 0:
        return "qouter"
    ratio = union * tiles.tokens_per_tile / picks
    return "qouter" if ratio <= bcfg.auto_ratio else "atomic"


def sparse_attention_bwd(q, k, v, out, lse, d_out, d_lse, tiles: QTileSchedule, blk_rows: torch.Tensor,
                         qk_rows: torch.Tensor, block_size: int, scale: float, deterministic: bool,
                         bcfg: BwdConfig, max_blocks: int, kl: Optional[KLKeyGrad] = None):
    """Gradients (dq, dk, dv) in the input dtype, plus, with ``kl``, the KL sum's gradient w.r.t.
    k_idx as fp32 [Tk, Di] (else None). max_blocks: upper bound on the key blocks of all sequences
    (sizes the KV-unit grid without a host sync)."""
    t, hq, hkv, dim, group = check_shapes(q, k, v, block_size)
    tk = k.shape[0]
    d_out = d_out.contiguous()
    delta = torch.empty((t, hq), dtype=torch.float32, device=q.device)
    rows = t * hq
    if rows:
        block_r = 64
        _delta_kernel[(triton.cdiv(rows, block_r),)](
            out, d_out, d_lse if d_lse is not None else delta, delta, rows,
            HAS_DLSE=d_lse is not None, D=dim, BLOCK_R=block_r)
    gp = next_pow2(group)
    block_n = min(bcfg.block_n, block_size)
    mode = "qouter" if deterministic else dq_mode(bcfg, tiles, blk_rows)
    units = build_kv_units(blk_rows, 0 if deterministic else bcfg.chunk, tk, max_blocks)
    dk32 = torch.zeros((tk, hkv, dim), dtype=torch.float32, device=q.device)
    dv32 = torch.zeros_like(dk32)
    dq32 = torch.zeros((t, hq, dim), dtype=torch.float32, device=q.device) if mode == "atomic" else None
    dki32 = None
    if kl is not None:
        # Deterministic: one buffer per group (each element gets one add), summed in a fixed order.
        dki32 = torch.zeros((hkv if deterministic else 1, tk, kl.k_idx.shape[1]), dtype=torch.float32,
                            device=q.device)
    if units.num_units:
        kl_args = ((kl.q_idx, kl.k_idx, kl.lses, kl.psum, dki32, t, tk * kl.k_idx.shape[1] if deterministic else 0,
                    kl.index_scale * LOG2E) if kl is not None else (dk32,) * 5 + (t, 0, 0.0))
        _sparse_bwd_kv_kernel[(units.num_units, block_size // block_n)](
            q, k, v, d_out, lse, delta, dq32 if dq32 is not None else dk32, dk32, dv32,
            units.tokens, units.unit_group, units.unit_block_row, units.unit_begin, units.unit_end, qk_rows,
            tk, scale, scale * LOG2E, *kl_args,
            HQ=hq, HKV=hkv, G=group, GP=gp, D=dim, TM=bcfg.tokens_per_step(group), BLOCK_N=block_n,
            WRITE_DQ=mode == "atomic", DOT_MODE=dot_mode(q.dtype), num_warps=bcfg.num_warps,
            num_stages=bcfg.num_stages, WITH_KL=kl is not None,
            DI=kl.k_idx.shape[1] if kl is not None else 16,
            TMK=max(16, next_pow2(bcfg.tokens_per_step(group))))
    if mode == "qouter":
        dq = torch.empty_like(q)
        if t:
            _sparse_bwd_dq_kernel[(tiles.num_tiles, hkv)](
                q, k, v, d_out, lse, delta, dq,
                tiles.block_rows, tiles.token_masks, tiles.counts, qk_rows,
                t, tk, tiles.num_tiles, tiles.stride, scale, scale * LOG2E,
                HQ=hq, HKV=hkv, G=group, GP=gp, D=dim, TM=tiles.tokens_per_tile, BLOCK_KV=block_size,
                BLOCK_N=min(bcfg.dq_block_n, block_size), DOT_MODE=dot_mode(q.dtype),
                num_warps=bcfg.dq_num_warps, num_stages=bcfg.dq_num_stages)
    else:
        dq = dq32.to(q.dtype)
    dk_idx = None
    if dki32 is not None:
        dk_idx = dki32.sum(0) * (kl.index_scale / group)  # the head mean's 1/G, d t / d k_idx
    return dq, dk32.to(k.dtype), dv32.to(v.dtype), dk_idx
