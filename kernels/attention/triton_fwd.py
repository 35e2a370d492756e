"""Sparse attention forward (Triton): per-token block selection, G heads packed into the MMA M dim.

One program owns TM consecutive query rows x the G heads of one KV group (M = TM * G rows; e.g. 8
tokens x 16 heads = 128 rows) and loops over the union of the blocks its tokens selected (built by
``triton_common.build_q_tiles``). Rows whose token did not pick the current block are masked, so each
row's softmax runs over exactly its own support; online softmax in fp32, output written once (no
per-block partial outputs in memory).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..kl.common import accumulate_row_stats, finish_rows
from ..layout import VarlenLayout
from ..triton_utils import dot, dot_precision
from .naive import check_topk_ids
from .triton_bwd import sparse_attention_bwd
from .triton_common import (LOG2E, BwdConfig, FwdConfig, QTileSchedule, block_key_rows, build_q_tiles,
                            bwd_config, check_shapes, default_scale, ensure_interpreter_compat, fwd_config,
                            dot_mode, interpreting, mma, next_pow2, query_key_rows)

ensure_interpreter_compat()

__all__ = ["sparse_attention_triton", "sparse_attention_fwd", "check_sparse_inputs", "forward_schedule"]


@triton.jit
def _sparse_fwd_kernel(
    Q, K, V, O, LSE,  # q/o [T, HQ, D], k/v [Tk, HKV, D], lse [T, HQ] fp32
    TILE_BLOCKS, TILE_MASKS, TILE_COUNTS, QK_ROW,
    T, TK, NUM_TILES, STRIDE, qk_scale,  # qk_scale = softmax scale * log2(e)
    QI, KI, KL_OUT, LSES, PSUM, DQI, iscale,  # WITH_KL: q_idx [T, HKV, DI], k_idx [Tk, DI]; [HKV, T] fp32 x3
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    TM: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_N: tl.constexpr, DOT_MODE: tl.constexpr,
    WITH_KL: tl.constexpr = False, WANT_DQ: tl.constexpr = False, DI: tl.constexpr = 16,
    TMK: tl.constexpr = 16, KL_PRECISION: tl.constexpr = "tf32",
):
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
    qk_row = tl.load(QK_ROW + tok, mask=row_ok, other=-1)  # [M]
    d = tl.arange(0, D)
    q_off = (tok.to(tl.int64) * HQ + head) * D  # [M]
    q = tl.load(Q + q_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)  # [M, D]

    m_i = tl.full([M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    acc = tl.zeros([M, D], dtype=tl.float32)

    sched = (r * NUM_TILES + tile).to(tl.int64)
    n_union = tl.load(TILE_COUNTS + sched)
    sched_off = sched * STRIDE
    n_cols = tl.arange(0, BLOCK_N)
    # One flat loop over (union block, sub-tile) so the loads of the next block pipeline with the
    # math of the current one.
    for it in range(0, n_union * NSUB):
        u = it // NSUB
        sub = it % NSUB
        blk_row = tl.load(TILE_BLOCKS + sched_off + u)
        bits = tl.load(TILE_MASKS + sched_off + u)
        picked = ((bits >> tm.to(tl.int64)) & 1) != 0  # [M]
        k_row = blk_row + sub * BLOCK_N + n_cols  # [BLOCK_N]
        kv_off = (k_row.to(tl.int64) * HKV + r) * D
        k_ok = k_row < TK
        k = tl.load(K + kv_off[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)  # [BLOCK_N, D]
        v = tl.load(V + kv_off[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)
        s = mma(q, tl.trans(k), DOT_MODE) * qk_scale  # [M, BLOCK_N], log2 units
        visible = picked[:, None] & (k_row[None, :] <= qk_row[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_MODE)
        m_i = m_new

    empty = l_i == 0.0  # rows that selected nothing: out = 0, lse = -inf (reference convention)
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    tl.store(O + q_off[:, None] + d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + tok.to(tl.int64) * HQ + head, lse, mask=row_ok)
    if WITH_KL:
        _kl_second_pass(Q, K, QI, KI, KL_OUT, LSES, PSUM, DQI, TILE_BLOCKS, TILE_MASKS, QK_ROW, q, m_i, l_i,
                        tile, r, n_union, sched_off, row_ok, qk_row, tm, g, T, TK, qk_scale, iscale,
                        HKV, G, D, TM, BLOCK_KV, BLOCK_N, DOT_MODE, WANT_DQ, DI, TMK, KL_PRECISION)


@triton.jit
def _kl_second_pass(Q, K, QI, KI, KL_OUT, LSES, PSUM, DQI, TILE_BLOCKS, TILE_MASKS, QK_ROW, q, m_i, l_i,
                    tile, r, n_union, sched_off, row_ok, qk_row, tm, g, T, TK, qk_scale, iscale,
                    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, TM: tl.constexpr,
                    BLOCK_KV: tl.constexpr, BLOCK_N: tl.constexpr, DOT_MODE: tl.constexpr,
                    WANT_DQ: tl.constexpr, DI: tl.constexpr, TMK: tl.constexpr, KL_PRECISION: tl.constexpr):
    """The indexer-KL forward from this tile's own teacher (KLTuning.kl_in_attention_fwd): with every
    row's final LSE known, loop over the tile's union blocks again, recompute the head rows'
    probabilities at the attention's MMA shape, reduce the G head rows of each token with one MMA
    against a 0/1 selection matrix, and fold the student (once per token) into the KL statistics of
    msa_kernels.kl.common. Writes KL, student LSE, teacher mass and dq_idx per (group, token)."""
    NSUB: tl.constexpr = BLOCK_KV // BLOCK_N
    empty = l_i == 0.0
    lse2 = tl.where(empty, 0.0, m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))  # log2 units
    tcol = tl.arange(0, TMK)
    t_tok = tile * TM + tcol
    t_ok = (tcol < TM) & (t_tok < T)
    t_rows = t_tok.to(tl.int64)
    t_qk = tl.load(QK_ROW + t_tok, mask=t_ok, other=-1)
    e = tl.arange(0, DI)
    qi = tl.load(QI + ((t_rows * HKV + r) * DI)[:, None] + e[None, :], mask=t_ok[:, None], other=0.0)
    # [TMK, M] 0/1: row i of the product sums the head rows of token slot i (padding heads excluded).
    sel_t = ((tcol[:, None] == tm[None, :]) & (g < G)[None, :]).to(tl.float32)
    km = tl.full([TMK], float("-inf"), tl.float32)
    kl_l = tl.zeros([TMK], tl.float32)
    psum = tl.zeros([TMK], tl.float32)
    plogp = tl.zeros([TMK], tl.float32)
    pt = tl.zeros([TMK], tl.float32)
    acc_e = tl.zeros([TMK, DI], tl.float32)
    acc_p = tl.zeros([TMK, DI], tl.float32)
    n_cols = tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    for it in range(0, n_union * NSUB):
        u = it // NSUB
        sub = it % NSUB
        blk_row = tl.load(TILE_BLOCKS + sched_off + u)
        bits = tl.load(TILE_MASKS + sched_off + u)
        picked = ((bits >> tm.to(tl.int64)) & 1) != 0  # [M]
        t_picked = ((bits >> tcol.to(tl.int64)) & 1) != 0  # [TMK]
        k_row = blk_row + sub * BLOCK_N + n_cols
        k_ok = k_row < TK
        k = tl.load(K + ((k_row.to(tl.int64) * HKV + r) * D)[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)
        s = mma(q, tl.trans(k), DOT_MODE) * qk_scale
        visible = (picked & row_ok)[:, None] & (k_row[None, :] <= qk_row[:, None])
        p = tl.where(visible, tl.math.exp2(s - lse2[:, None]), 0.0)  # [M, BLOCK_N] each head's probability
        p_tok = dot(sel_t, p, KL_PRECISION) / G  # [TMK, BLOCK_N] teacher: mean over the group's heads
        mask = (t_ok & t_picked)[:, None] & k_ok[None, :] & (k_row[None, :] <= t_qk[:, None])
        ki = tl.load(KI + k_row.to(tl.int64)[:, None] * DI + e[None, :], mask=k_ok[:, None], other=0.0)
        t = tl.where(mask, dot(qi, tl.trans(ki), KL_PRECISION) * iscale, float("-inf"))
        km, kl_l, psum, plogp, pt, acc_e, acc_p = accumulate_row_stats(
            p_tok, t, ki, mask, km, kl_l, psum, plogp, pt, acc_e, acc_p, WANT_DQ, KL_PRECISION)
    finish_rows(KL_OUT, LSES, PSUM, DQI, t_rows, t_ok, r, T, HKV * DI, DI, km, kl_l, psum, plogp, pt,
                acc_e, acc_p, iscale, DI, DI, WANT_DQ)


def sparse_attention_fwd(q, k, v, tiles: QTileSchedule, qk_rows: torch.Tensor, block_size: int,
                         scale: float, cfg: FwdConfig, kl: Optional[tuple] = None):
    """Launch the forward. Returns out [T, Hq, D] (q.dtype) and lse [T, Hq] fp32 (natural log).

    kl = (q_idx, k_idx, index_scale, want_dq): also compute the indexer-KL forward from the tile's own
    probabilities (see _kl_second_pass) and return (out, lse, (kl [Hkv, T], student lse [Hkv, T],
    teacher mass [Hkv, T], dq_idx [T, Hkv, Di] fp32 or None))."""
    t, hq, hkv, dim, group = check_shapes(q, k, v, block_size)
    out = torch.empty_like(q)
    lse = torch.empty((t, hq), dtype=torch.float32, device=q.device)
    kl_out = None
    kl_args, kl_meta = (out,) * 6 + (0.0,), {}
    if kl is not None:
        q_idx, k_idx, iscale, want_dq = kl
        stats = torch.empty((3, hkv, t), dtype=torch.float32, device=q.device)
        dq_idx = torch.empty((t, hkv, q_idx.shape[2]), dtype=torch.float32, device=q.device) if want_dq else None
        kl_out = (stats[0], stats[1], stats[2], dq_idx)
        kl_args = (q_idx, k_idx, stats[0], stats[1], stats[2], dq_idx if want_dq else stats[0], float(iscale))
        kl_meta = dict(WITH_KL=True, WANT_DQ=bool(want_dq), DI=q_idx.shape[2],
                       TMK=max(16, next_pow2(tiles.tokens_per_tile)), KL_PRECISION=dot_precision(q.dtype))
    if t == 0:
        return (out, lse) if kl is None else (out, lse, kl_out)
    tm = tiles.tokens_per_tile
    block_n = min(cfg.block_n, block_size)
    grid = (tiles.num_tiles, hkv)
    _sparse_fwd_kernel[grid](
        q, k, v, out, lse,
        tiles.block_rows, tiles.token_masks, tiles.counts, qk_rows,
        t, k.shape[0], tiles.num_tiles, tiles.stride, scale * LOG2E, *kl_args,
        HQ=hq, HKV=hkv, G=group, GP=next_pow2(group), D=dim,
        TM=tm, BLOCK_KV=block_size, BLOCK_N=block_n,
        DOT_MODE=dot_mode(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **kl_meta,
    )
    return (out, lse) if kl is None else (out, lse, kl_out)


def check_sparse_inputs(q, k, v, topk_idx, layout: VarlenLayout, block_size: int, check_ids: bool = True) -> None:
    t, hq, hkv, dim, group = check_shapes(q, k, v, block_size)
    if topk_idx.dim() != 3 or topk_idx.shape[0] != hkv or topk_idx.shape[1] != t:
        raise ValueError(f"topk_idx must be [Hkv={hkv}, T={t}, topk], got {list(topk_idx.shape)}")
    if topk_idx.dtype != torch.int32:
        raise TypeError(f"topk_idx must be int32, got {topk_idx.dtype}")
    if layout.total_q != t or layout.total_k != k.shape[0]:
        raise ValueError(f"layout covers {layout.total_q} queries / {layout.total_k} keys but q has {t} rows "
                         f"and k has {k.shape[0]}")
    if check_ids:
        check_topk_ids(topk_idx, layout, block_size)
    ensure_interpreter_compat()


def forward_schedule(topk_idx, layout: VarlenLayout, block_size: int, tokens_per_tile: int,
                     reuse: Optional[Tuple[torch.Tensor, QTileSchedule]] = None):
    """(qk_rows, blk_rows, union tiles) of the forward. reuse: (blk_rows, tiles) already built from
    the same topk_idx (e.g. by the KL); its tiles are kept when their tokens per tile match."""
    blk_rows, tiles = reuse if reuse is not None else (block_key_rows(topk_idx, layout, block_size), None)
    if tiles is None or tiles.tokens_per_tile != tokens_per_tile:
        tiles = build_q_tiles(blk_rows, tokens_per_tile)
    return query_key_rows(layout), blk_rows, tiles


class _SparseAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, topk_idx, layout, block_size, scale, deterministic, fcfg, bcfg):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        qk_rows, blk_rows, tiles = forward_schedule(topk_idx, layout, block_size,
                                                    fcfg.tokens_per_tile(q.shape[1] // k.shape[1]))
        out, lse = sparse_attention_fwd(q, k, v, tiles, qk_rows, block_size, scale, fcfg)
        ctx.save_for_backward(q, k, v, out, lse, blk_rows, qk_rows)
        ctx.tiles = tiles
        ctx.args = (block_size, scale, deterministic, fcfg, bcfg, layout.total_blocks(block_size))
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse, blk_rows, qk_rows = ctx.saved_tensors
        block_size, scale, deterministic, fcfg, bcfg, max_blocks = ctx.args
        if d_out is None:
            d_out = torch.zeros_like(out)
        if d_lse is not None:
            d_lse = d_lse.contiguous().float()
        dq, dk, dv, _ = sparse_attention_bwd(q, k, v, out, lse, d_out, d_lse, ctx.tiles, blk_rows, qk_rows,
                                             block_size, scale, deterministic, bcfg, max_blocks)
        return dq, dk, dv, None, None, None, None, None, None, None


def sparse_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk_idx: torch.Tensor,
                            layout: VarlenLayout, block_size: int = 128, scale: Optional[float] = None,
                            deterministic: bool = False, *, fwd_cfg: Optional[FwdConfig] = None,
                            bwd_cfg: Optional[BwdConfig] = None, check_ids: bool = True):
    """Triton sparse attention. q [T, Hq, D], k/v [Tk, Hkv, D], topk_idx int32 [Hkv, T, K] (block ids
    local to each sequence, -1 = unused). Returns (out [T, Hq, D], lse [T, Hq] fp32, natural log);
    differentiable in q, k, v (and lse's gradient flows back through the scores).
    deterministic=True: bitwise-reproducible gradients (no dQ atomics; one KV unit per block).
    check_ids=False skips validating the ids (one device sync), for select_blocks output."""
    t, hq, hkv, dim, group = check_shapes(q, k, v, block_size)
    check_sparse_inputs(q, k, v, topk_idx, layout, block_size, check_ids)
    interp = interpreting()
    fcfg = fwd_cfg or fwd_config(dim, group, block_size, interp)
    bcfg = bwd_cfg or bwd_config(dim, group, block_size, interp)
    scale = default_scale(dim) if scale is None else float(scale)
    return _SparseAttentionTriton.apply(q, k, v, topk_idx, layout, block_size, scale, deterministic, fcfg, bcfg)
