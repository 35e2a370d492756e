"""Triton select_blocks: indexer score GEMM + causal block max + exp-free running top-(k-1).

One program owns BLOCK_M consecutive queries of one fragment and one index head r. It streams the
key blocks the tile can see, computes the [BLOCK_M, Bk] score tile on the tensor cores, reduces it to
the block max in the epilogue and inserts that max into a per-row top-(k-1) list held in registers.
The [T, T/Bk, Hkv] block-score matrix never exists: memory is O(T * topk).

Only blocks strictly before a query's local block compete for the k-1 free slots, and every such
block is fully visible to that query, so the score tile needs no causal mask. The local block (the
only partially visible one) is always selected and written to the last valid slot.

Ordering contract (matches the reference): free slots hold the winners sorted by block score
descending, ties by lower block id; forced blocks (sink / local window) come first in ascending id
order; then the local block; then -1.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._triton_compat import ensure_interpreter_compat
from ..triton_utils import dot, dot_precision, frag_table, pow2_at_least_16, query_tile_table
from ..tuning import SelectTuning, interpret_tiles, select_tuning

__all__ = ["select_blocks_triton"]


ensure_interpreter_compat()


# Sentinel block id for an empty top-k slot. Larger than any real block id so that, among -inf
# entries, an empty slot is always the one evicted first.
_EMPTY_ID = tl.constexpr(1 << 29)


@triton.jit
def _select_blocks_kernel(
    QI, KI, OUT,  # q_idx [T, Hkv, Di], k_idx [Tk, Di], out int32 [Hkv, T, TOPK]
    TILE_FRAG, TILE_M0,  # int32 [n_tiles]: fragment of the tile, first query offset in fragment
    FRAG,  # int64 [F, 4]: q_start, q_len, k_start, k_len
    stride_qt, stride_qh, stride_kt, stride_oh, stride_ot,
    scale,
    LOCAL_WINDOW,
    FORCE_SINK: tl.constexpr,
    DI: tl.constexpr,
    DIP: tl.constexpr,  # DI rounded up to a power of two >= 16
    BLOCK_M: tl.constexpr,
    BK: tl.constexpr,
    BKP: tl.constexpr,  # BK rounded up to a power of two >= 16
    TOPK: tl.constexpr,
    KPAD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    f = tl.load(TILE_FRAG + tile).to(tl.int64)
    m0 = tl.load(TILE_M0 + tile).to(tl.int64)
    q_start = tl.load(FRAG + f * 4 + 0)
    q_len = tl.load(FRAG + f * 4 + 1)
    k_start = tl.load(FRAG + f * 4 + 2)
    k_len = tl.load(FRAG + f * 4 + 3)

    offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)  # [M] query offset inside the fragment
    row_ok = offs_m < q_len
    pos = k_len - q_len + offs_m  # [M] position inside the key sequence (bottom-right aligned)
    local = tl.where(row_ok, pos // BK, 0)  # [M] local block id
    offs_d = tl.arange(0, DIP)
    d_ok = offs_d < DI
    offs_n = tl.arange(0, BKP).to(tl.int64)
    n_ok = offs_n < BK

    q_ptrs = QI + (q_start + offs_m)[:, None] * stride_qt + r * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [M, DIP]

    # Forced blocks (paper ablation C.2) fill the first slots: the sink, then the window blocks
    # nearest first; block 0 inside the window counts once, as the sink.
    win_lo = tl.maximum(local - LOCAL_WINDOW, 0)  # [M] window = blocks [win_lo, local)
    sink_first = tl.zeros([BLOCK_M], tl.int64)
    if FORCE_SINK:
        sink_first = (local > 0).to(tl.int64)
    n_forced = sink_first + (local - win_lo) - (sink_first * (win_lo == 0).to(tl.int64))  # [M]
    n_forced_kept = tl.minimum(n_forced, TOPK - 1)
    n_free = tl.maximum(tl.minimum(TOPK - 1 - n_forced, local - n_forced), 0)  # [M]
    n_valid = n_forced_kept + n_free  # [M] slots before the local block

    col = tl.arange(0, KPAD)[None, :]  # [1, KPAD]
    slot_ok = col < (TOPK - 1)
    top_v = tl.full([BLOCK_M, KPAD], float("-inf"), tl.float32)
    # int32 ids: half the registers and compare cost of int64 in the per-block insertion.
    top_i = tl.zeros([BLOCK_M, KPAD], tl.int32) + _EMPTY_ID + col  # distinct ids keep eviction unique

    # Candidates are blocks [0, hi): hi is the local block of the tile's last valid query.
    hi = ((k_len - q_len + tl.minimum(m0 + BLOCK_M, q_len) - 1) // BK).to(tl.int32)  # b is int32
    for b in range(0, hi):
        k_rows = b * BK + offs_n  # [BKP] row inside the key sequence
        k_ptrs = KI + (k_start + k_rows)[:, None] * stride_kt + offs_d[None, :]
        k = tl.load(k_ptrs, mask=(n_ok & (k_rows < k_len))[:, None] & d_ok[None, :], other=0.0)
        s = dot(q, tl.trans(k), PRECISION)  # [M, BKP] fp32
        if BKP != BK:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        m = tl.max(s, 1) * scale  # [M] block max logit
        forced = (b >= win_lo) & (LOCAL_WINDOW > 0)
        if FORCE_SINK:
            forced = forced | (b == 0)
        cand = row_ok & (b < local) & (~forced)
        # Evict the worst entry: lowest score, ties broken toward the higher block id.
        min_v = tl.min(tl.where(slot_ok, top_v, float("inf")), 1)  # [M]
        is_min = slot_ok & (top_v == min_v[:, None])
        worst = tl.max(tl.where(is_min, top_i, -1), 1)  # [M]
        # b exceeds every stored id, so an equal score loses the tie: strict comparison.
        take = cand & (m > min_v)
        put = is_min & (top_i == worst[:, None]) & take[:, None]
        top_v = tl.where(put, m[:, None], top_v)
        top_i = tl.where(put, b, top_i)

    out_base = OUT + r * stride_oh + (q_start + offs_m) * stride_ot  # [M] pointers
    for j in tl.static_range(TOPK):
        if j < TOPK - 1:
            # Extract the current best (score desc, id asc) when slot j is a ranked slot of the row.
            best_v = tl.max(tl.where(slot_ok, top_v, float("-inf")), 1)
            is_best = slot_ok & (top_v == best_v[:, None])
            best_i = tl.min(tl.where(is_best, top_i, _EMPTY_ID * 2), 1)
            use = (j >= n_forced_kept)[:, None] & is_best & (top_i == best_i[:, None])
            top_v = tl.where(use, float("-inf"), top_v)
            top_i = tl.where(use, _EMPTY_ID * 2, top_i)
            forced_id = tl.where(j < sink_first, 0, local - 1 - (j - sink_first))
            val = tl.where(j < n_forced_kept, forced_id, best_i)
            val = tl.where(j < n_valid, val, tl.where(j == n_valid, local, -1))
        else:
            val = tl.where(j == n_valid, local, -1)
        tl.store(out_base + j, val.to(tl.int32), mask=row_ok)


def select_blocks_triton(q_idx, k_idx, layout, *, block_size: int, topk: int, index_scale: float,
                         force_sink: bool = False, local_window: int = 0,
                         tuning: Optional[SelectTuning] = None) -> torch.Tensor:
    """Per (query, index head) top-k key blocks; contract in msa_kernels.select_blocks.

    q_idx [T, Hkv, Di], k_idx [Tk, Di] -> int32 [Hkv, T, topk], -1 padded, local block in the last
    valid slot; ranked slots sorted by score (desc, ties -> lower id). ``tuning`` overrides the
    default tiles (msa_kernels.tuning.select_tuning).
    """
    T, hkv, di = q_idx.shape
    if topk > 128:
        raise ValueError(f"topk={topk} exceeds the Triton kernel's register budget (<= 128)")
    if block_size > 256:
        raise ValueError(f"block_size={block_size} exceeds the Triton kernel's tile (<= 256)")
    if di > 256:
        raise ValueError(f"index head dim Di={di} exceeds the Triton kernel's tile (<= 256)")
    if k_idx.dtype != q_idx.dtype:
        raise TypeError(f"k_idx dtype {k_idx.dtype} must match q_idx dtype {q_idx.dtype}")
    q_idx = q_idx if q_idx.stride(-1) == 1 else q_idx.contiguous()
    k_idx = k_idx if k_idx.stride(-1) == 1 else k_idx.contiguous()
    out = torch.empty((hkv, T, topk), dtype=torch.int32, device=q_idx.device)
    if T == 0 or hkv == 0:
        return out
    cfg = tuning or select_tuning(interpret_tiles(q_idx.device))
    block_m = cfg.block_m
    tile_frag, tile_m0 = query_tile_table(layout, block_m, q_idx.device)
    frag = frag_table(layout, q_idx.device)
    kpad = max(2, triton.next_power_of_2(max(topk - 1, 1)))
    grid = (tile_frag.numel(), hkv)
    _select_blocks_kernel[grid](
        q_idx, k_idx, out, tile_frag, tile_m0, frag,
        q_idx.stride(0), q_idx.stride(1), k_idx.stride(0), out.stride(0), out.stride(1),
        float(index_scale), int(local_window),
        FORCE_SINK=bool(force_sink), DI=di, DIP=pow2_at_least_16(di), BLOCK_M=block_m,
        BK=block_size, BKP=pow2_at_least_16(block_size), TOPK=topk, KPAD=kpad,
        PRECISION=dot_precision(q_idx.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
