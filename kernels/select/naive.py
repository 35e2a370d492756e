"""Exact PyTorch reference of select_blocks (the oracle for select/triton.py).

Chunked over queries: each chunk builds a [Hkv, chunk, key_len] fp32 score matrix, never T x T.
"""
from __future__ import annotations

import torch

from .. import layout as _layout
from ..attention.naive import exact_fp32_matmul
from ..layout import Fragment, VarlenLayout

__all__ = ["select_blocks_ref", "block_scores_chunk", "block_scores_ref", "rank_blocks"]


def block_scores_chunk(q_idx: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor, block_size: int,
                       num_blocks: int, index_scale: float) -> torch.Tensor:
    """Causal block-max index scores of one query chunk.

    q_idx [c, Hkv, Di], keys [Lk, Di] (the sequence's keys), pos [c] int64 query positions
    -> fp32 [Hkv, c, num_blocks]; a block with no key j <= pos scores -inf.
    """
    s = torch.einsum("chd,jd->hcj", q_idx.float(), keys.float()) * index_scale  # [Hkv, c, Lk]
    lk = keys.shape[0]
    future = torch.arange(lk, device=s.device)[None, :] > pos[:, None]  # [c, Lk]
    s = s.masked_fill(future, float("-inf"))
    pad = num_blocks * block_size - lk
    if pad:
        s = torch.nn.functional.pad(s, (0, pad), value=float("-inf"))
    return s.view(s.shape[0], s.shape[1], num_blocks, block_size).amax(dim=-1)


def rank_blocks(scores: torch.Tensor, pos: torch.Tensor, block_size: int, topk: int,
                force_sink: bool, local_window: int) -> torch.Tensor:
    """Turn block scores [Hkv, c, nb] of queries at positions pos [c] into int32 [Hkv, c, topk].

    Slot order: forced blocks (sink, then window blocks nearest first), then the other visible blocks
    by score descending (ties -> lower id), then the local block, then -1.
    """
    hkv, c, nb = scores.shape
    dev = scores.device
    local = torch.div(pos, block_size, rounding_mode="floor")  # [c]
    bid = torch.arange(nb, device=dev)
    # Priority class per block (lower ranks first): sink 0, window block at distance d -> d,
    # ordinary visible block local_window+1, local or invisible blocks last (never taken here).
    excluded = local_window + 2
    dist = local[:, None] - bid[None, :]  # [c, nb]
    cls = torch.full((c, nb), excluded, device=dev, dtype=torch.int64)
    cls = torch.where(dist >= 1, torch.full_like(cls, local_window + 1), cls)
    if local_window > 0:
        cls = torch.where((dist >= 1) & (dist <= local_window), dist, cls)
    if force_sink:
        cls = torch.where((bid[None, :] == 0) & (dist >= 1), torch.zeros_like(cls), cls)
    # Stable sorts from the least to the most significant key: id asc (initial order), score desc,
    # then class asc.
    by_score = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # [Hkv, c, nb]
    cls_sorted = cls.expand(hkv, c, nb).gather(-1, by_score)
    order = by_score.gather(-1, torch.sort(cls_sorted, dim=-1, stable=True).indices)

    n_other = torch.clamp(local, max=topk - 1)  # non-local visible blocks that fit: blocks 0..local-1
    out = torch.full((hkv, c, topk), -1, dtype=torch.int64, device=dev)
    width = min(topk - 1, nb)
    if width > 0:
        take = order[..., :width]
        keep = torch.arange(width, device=dev)[None, :] < n_other[:, None]  # [c, width]
        out[..., :width] = torch.where(keep, take, torch.full_like(take, -1))
    out.scatter_(-1, n_other.view(1, c, 1).expand(hkv, c, 1), local.view(1, c, 1).expand(hkv, c, 1))
    return out.to(torch.int32)


def _positions(frag: Fragment, a: int, b: int, device) -> torch.Tensor:
    return torch.arange(frag.pos_offset + a, frag.pos_offset + b, device=device, dtype=torch.int64)


def select_blocks_ref(q_idx: torch.Tensor, k_idx: torch.Tensor, layout: VarlenLayout, *, block_size: int,
                      topk: int, index_scale: float, force_sink: bool = False,
                      local_window: int = 0) -> torch.Tensor:
    """Reference select_blocks: q_idx [T, Hkv, Di], k_idx [Tk, Di] -> int32 [Hkv, T, topk]."""
    t, hkv, _ = q_idx.shape
    out = torch.empty((hkv, t, topk), dtype=torch.int32, device=q_idx.device)  # every row is written
    with exact_fp32_matmul(q_idx.device):
        _select_into(out, q_idx, k_idx, layout, block_size, topk, index_scale, force_sink, local_window)
    return out


def _select_into(out, q_idx, k_idx, layout, block_size, topk, index_scale, force_sink, local_window):
    hkv = q_idx.shape[1]
    for frag in layout:
        if frag.q_len == 0:
            continue
        keys = k_idx[frag.k_start:frag.k_start + frag.k_len]  # [Lk, Di]
        nb = frag.num_blocks(block_size)
        for a, b in _layout.query_chunks(frag, hkv * max(frag.k_len, 1), q_idx.device):
            pos = _positions(frag, a, b, q_idx.device)
            rows = slice(frag.q_start + a, frag.q_start + b)
            scores = block_scores_chunk(q_idx[rows], keys, pos, block_size, nb, index_scale)
            out[:, rows] = rank_blocks(scores, pos, block_size, topk, force_sink, local_window)


def block_scores_ref(q_idx: torch.Tensor, k_idx: torch.Tensor, layout: VarlenLayout, *, block_size: int,
                     index_scale: float) -> torch.Tensor:
    """fp32 [Hkv, T, max_blocks] causal block-max scores (-inf where invisible / past the sequence).

    O(T^2 / block_size) memory: for tests and diagnostics (e.g. near-tie tolerant selection
    comparisons, recall metrics), not for the training path.
    """
    t, hkv, _ = q_idx.shape
    nb_max = layout.max_blocks(block_size)
    out = torch.full((hkv, t, nb_max), float("-inf"), dtype=torch.float32, device=q_idx.device)
    with exact_fp32_matmul(q_idx.device):
        _block_scores_into(out, q_idx, k_idx, layout, block_size, index_scale)
    return out


def _block_scores_into(out, q_idx, k_idx, layout, block_size, index_scale):
    hkv = q_idx.shape[1]
    for frag in layout:
        if frag.q_len == 0:
            continue
        keys = k_idx[frag.k_start:frag.k_start + frag.k_len]
        nb = frag.num_blocks(block_size)
        for a, b in _layout.query_chunks(frag, hkv * max(frag.k_len, 1), q_idx.device):
            pos = _positions(frag, a, b, q_idx.device)
            rows = slice(frag.q_start + a, frag.q_start + b)
            out[:, rows, :nb] = block_scores_chunk(q_idx[rows], keys, pos, block_size, nb, index_scale)
