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

from ..layout import VarlenLayout
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
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    TM: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_N: tl.constexpr, DOT_MODE: tl.constexpr,
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


def sparse_attention_fwd(q, k, v, tiles: QTileSchedule, qk_rows: torch.Tensor, block_size: int,
                         scale: float, cfg: FwdConfig):
    """Launch the forward. Returns out [T, Hq, D] (q.dtype) and lse [T, Hq] fp32 (natural log)."""
    t, hq, hkv, dim, group = check_shapes(q, k, v, block_size)
    out = torch.empty_like(q)
    lse = torch.empty((t, hq), dtype=torch.float32, device=q.device)
    if t == 0:
        return out, lse
    tm = tiles.tokens_per_tile
    block_n = min(cfg.block_n, block_size)
    grid = (tiles.num_tiles, hkv)
    _sparse_fwd_kernel[grid](
        q, k, v, out, lse,
        tiles.block_rows, tiles.token_masks, tiles.counts, qk_rows,
        t, k.shape[0], tiles.num_tiles, tiles.stride, scale * LOG2E,
        HQ=hq, HKV=hkv, G=group, GP=next_pow2(group), D=dim,
        TM=tm, BLOCK_KV=block_size, BLOCK_N=block_n,
        DOT_MODE=dot_mode(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


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
