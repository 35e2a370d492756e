"""Index preprocessing shared by the sparse-attention Triton kernels.

Everything here is plain PyTorch on the inputs' device (GPU sorts and scans, no Python loop over
tokens). It turns the per-token block ids of ``topk_idx`` into the two schedules the kernels run:

* Q tiles (forward and the deterministic dQ pass): ``TM`` consecutive query rows x the G heads of a
  KV group form one MMA tile; the tile loops over the UNION of its tokens' selected blocks, and a
  per-(tile, block) bitmask says which of the TM tokens picked the block.
* KV units (KV-outer backward): a reverse block -> query CSR (entries sorted by (group, block), then
  token), cut into chunks of at most ``chunk`` queries so a block picked by every query (block 0,
  document starts) does not become one serial tail.

Blocks are identified by the ABSOLUTE key row of their first token (``k_start`` of the token's key
sequence + block id * block_size): this single number works for packed sequences and for the
context-parallel layout (several query fragments sharing one key sequence) alike, and lets the
kernels apply the causal rule as ``key_row <= qk_row`` with ``qk_row`` the key row of the query's own
position.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._triton_compat import ensure_interpreter_compat, fp32_products, interpreting  # noqa: F401 (re-exported)
from ..layout import VarlenLayout
from ..triton_utils import next_pow2
from ..tuning import BwdConfig, FwdConfig, bwd_config, fwd_config  # noqa: F401 (re-exported)

__all__ = ["QTileSchedule", "KVUnitSchedule", "query_key_rows", "block_key_rows",
           "build_q_tiles", "build_kv_units", "next_pow2",
           "LOG2E", "FwdConfig", "fwd_config", "BwdConfig", "bwd_config", "check_shapes", "default_scale",
           "interpreting", "mma", "dot_mode"]

LOG2E = 1.4426950408889634


def query_key_rows(layout: VarlenLayout) -> torch.Tensor:
    """int32 [T]: row of k / v holding each query's own position (the last key it may see)."""
    frag = layout.token_fragment().to(torch.int64)
    rows = layout.k_starts[frag] + layout.token_positions()
    return rows.to(torch.int32)


def block_key_rows(topk_idx: torch.Tensor, layout: VarlenLayout, block_size: int) -> torch.Tensor:
    """int64 [Hkv, T, K]: absolute key row of each selected block's first token; -1 where unused."""
    frag = layout.token_fragment().to(torch.int64)
    k_start = layout.k_starts[frag]  # [T]
    ids = topk_idx.to(torch.int64)
    rows = k_start[None, :, None] + ids * block_size
    return torch.where(ids >= 0, rows, torch.full_like(rows, -1))


@dataclass
class QTileSchedule:
    """Union of selected blocks per (KV group, tile of TM consecutive query rows)."""

    tokens_per_tile: int
    num_tiles: int
    stride: int  # slots per (group, tile) = TM * K
    block_rows: torch.Tensor  # int32 [Hkv, num_tiles, stride] first key row of each union block, ascending
    token_masks: torch.Tensor  # int64 [Hkv, num_tiles, stride] bit tm set if token tm of the tile picked it
    counts: torch.Tensor  # int32 [Hkv, num_tiles] union size


@triton.jit
def _union_tiles_kernel(BLK, OUT_ROWS, OUT_MASKS, OUT_COUNTS, T, NUM_TILES, STRIDE,
                        K: tl.constexpr, TM: tl.constexpr, E: tl.constexpr):
    """One program per (tile, group): sort the tile's (block row, token) picks, keep one slot per
    distinct block (ascending) and OR the picking tokens' bits into its mask."""
    tile = tl.program_id(0)
    r = tl.program_id(1)
    e = tl.arange(0, E)
    tm = e // K
    tok = tile * TM + tm
    ok = (tok < T) & (e < TM * K)
    row = tl.load(BLK + (r.to(tl.int64) * T + tok) * K + e % K, mask=ok, other=-1)  # int64 [E]
    big: tl.constexpr = 1 << 62
    key = tl.sort(tl.where(row >= 0, row * TM + tm, big))
    valid = key != big
    blk = key // TM
    prev = tl.gather(key, tl.maximum(e - 1, 0), 0)
    first = e == 0
    new_pair = valid & (first | (key != prev))  # a token's duplicate picks count once
    new_blk = valid & (first | (blk != prev // TM))
    slot = tl.cumsum(new_blk.to(tl.int32), 0) - 1
    base = (r * NUM_TILES + tile).to(tl.int64) * STRIDE
    tl.store(OUT_ROWS + base + slot, blk.to(tl.int32), mask=new_blk)
    tl.atomic_or(OUT_MASKS + base + slot, tl.full([E], 1, tl.int64) << (key % TM), mask=new_pair)
    tl.store(OUT_COUNTS + r * NUM_TILES + tile, tl.sum(new_blk.to(tl.int32), 0))


def build_q_tiles(blk_rows: torch.Tensor, tokens_per_tile: int) -> QTileSchedule:
    """Union of the tokens' blocks per Q tile. blk_rows: int64 [Hkv, T, K] from block_key_rows."""
    hkv, t, k = blk_rows.shape
    tm = int(tokens_per_tile)
    if not 1 <= tm <= 32:
        raise ValueError(f"tokens_per_tile must be in [1, 32] (one bit per token in a mask), got {tm}")
    num_tiles = -(-t // tm)
    stride = tm * k
    dev = blk_rows.device
    rows = torch.empty((hkv, num_tiles, stride), dtype=torch.int32, device=dev)  # read only below counts
    masks = torch.zeros((hkv, num_tiles, stride), dtype=torch.int64, device=dev)
    counts = torch.zeros((hkv, num_tiles), dtype=torch.int32, device=dev)
    if num_tiles and k:
        _union_tiles_kernel[(num_tiles, hkv)](blk_rows.contiguous(), rows, masks, counts, t, num_tiles, stride,
                                              K=k, TM=tm, E=max(16, next_pow2(stride)))
    return QTileSchedule(tokens_per_tile=tm, num_tiles=num_tiles, stride=stride, block_rows=rows,
                         token_masks=masks, counts=counts)


@dataclass
class KVUnitSchedule:
    """Reverse block -> query index, cut into work units of at most ``chunk`` queries."""

    num_units: int  # grid size; units past the last real one are empty (begin == end)
    tokens: torch.Tensor  # int32 [Hkv*T*K] query rows grouped by (group, block), ascending; -1 = skip
    unit_group: torch.Tensor  # int32 [U] KV head r
    unit_block_row: torch.Tensor  # int32 [U] first key row of the unit's block
    unit_begin: torch.Tensor  # int32 [U] range of ``tokens`` owned by the unit
    unit_end: torch.Tensor  # int32 [U]


def build_kv_units(blk_rows: torch.Tensor, chunk: int, num_rows: int, max_blocks: int) -> KVUnitSchedule:
    """Sort the (group, block, token) picks by (group, block) and cut them into units, with no host
    sync: the unit grid is an upper bound (extra units are empty and exit at once).

    chunk: most queries per unit; 0 means one unit per (group, block) (deterministic dK/dV: every
    key row then receives exactly one contribution). num_rows: rows of k (every block row is
    smaller). max_blocks: an upper bound on the distinct blocks of all key sequences.
    Entries of unused slots and a token's repeated pick of one block keep their place in ``tokens``
    as -1 (the kernel skips them), so no compaction (and no sync) is needed.
    """
    hkv, t, k = blk_rows.shape
    dev = blk_rows.device
    n_ent = hkv * t * k
    n_seg = hkv * num_rows
    flat = blk_rows.reshape(-1)
    group = torch.arange(n_ent, device=dev) // max(t * k, 1)
    seg = torch.where(flat >= 0, group * num_rows + flat, torch.full_like(flat, n_seg))  # unused -> after all
    if n_seg < 2 ** 31 - 1:
        seg = seg.to(torch.int32)  # 32-bit radix sort: about half the passes of int64
    # Stable: inside a segment the entries keep (t, slot) order, so tokens stay ascending and a
    # token's duplicate picks of one block end up adjacent.
    seg, order = torch.sort(seg, stable=True)
    tok = (order // max(k, 1)) % max(t, 1)
    skip = seg == n_seg
    if n_ent > 1:
        skip[1:] |= (seg[1:] == seg[:-1]) & (tok[1:] == tok[:-1])
    tok = torch.where(skip, torch.full_like(tok, -1), tok)
    counts = torch.bincount(seg, minlength=n_seg + 1)[:n_seg]  # [Hkv * rows], mostly zeros
    seg_start = torch.cumsum(counts, 0) - counts
    if chunk <= 0:
        chunks = (counts > 0).to(counts.dtype)
        size = counts
        grid = hkv * max_blocks
    else:
        chunks = torch.div(counts + chunk - 1, chunk, rounding_mode="floor")
        size = torch.full_like(counts, chunk)
        grid = hkv * max_blocks + -(-n_ent // chunk)
    ends = torch.cumsum(chunks, 0)
    unit = torch.arange(grid, device=dev)
    useg = torch.searchsorted(ends, unit, right=True).clamp_(max=max(n_seg - 1, 0))
    j = unit - (ends[useg] - chunks[useg])
    begin = seg_start[useg] + j * size[useg]
    end = torch.minimum(begin + size[useg], seg_start[useg] + counts[useg])
    live = unit < ends[-1] if n_seg else torch.zeros_like(unit, dtype=torch.bool)
    end = torch.where(live, end, begin)
    return KVUnitSchedule(
        num_units=grid,
        tokens=tok.to(torch.int32).contiguous(),
        unit_group=(useg // num_rows).to(torch.int32).contiguous(),
        unit_block_row=(useg % num_rows).to(torch.int32).contiguous(),
        unit_begin=begin.to(torch.int32).contiguous(),
        unit_end=end.to(torch.int32).contiguous())


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> tuple:
    """Validate the kernel-specific limits and return (T, Hq, Hkv, D, G)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [T, H, D]; got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    t, hq, dim = q.shape
    tk, hkv, dk = k.shape
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {list(k.shape)}, got {list(v.shape)}")
    if dk != dim:
        raise ValueError(f"k head dim {dk} must equal q head dim {dim}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv})")
    if dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"head dim must be one of 16, 32, 64, 128, 256 for the Triton kernels, got {dim}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 for the Triton kernels, got {block_size}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return t, hq, hkv, dim, hq // hkv


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


# mma operand modes (a constexpr): the operands' own precision, the interpreter's bf16 upcast, or
# IEEE fp32 for fp32 inputs.
DOT_NATIVE, DOT_UPCAST, DOT_IEEE = 0, 1, 2


@triton.jit
def mma(a, b, DOT_MODE: tl.constexpr):
    """tl.dot with fp32 accumulation. DOT_UPCAST (CPU interpreter only: Triton 3.6's interpreter
    multiplies bfloat16 operands as raw bits) and DOT_IEEE (fp32 inputs) multiply in full fp32;
    DOT_NATIVE leaves bf16/fp16 operands as they are, and fp32 ones to Triton's TF32 default."""
    if DOT_MODE == 1:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT_MODE == 2:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


def dot_mode(dtype: torch.dtype) -> int:
    """fp32 inputs multiply in fp32 (TF32 only when torch's fp32 matmuls may use it)."""
    if dtype == torch.float32:
        return DOT_IEEE if fp32_products() else DOT_NATIVE
    return DOT_UPCAST if interpreting() and dtype == torch.bfloat16 else DOT_NATIVE


