"""FlexAttention baselines over one sequence (torch.nn.attention.flex_attention).

approx: block-sparse at the same budget: every query tile of ``block_size`` queries shares the
        blocks its FIRST query selected (plus its own diagonal block, causal). Coarser than MSA
        (per-tile instead of per-query selection): a lower bound for a query-tile design.
exact:  the SAME operation as msa_kernels.sparse_attention: per query tile the BlockMask holds the
        union of the blocks its queries selected, and a mask_mod keeps, for each query, only its own
        blocks (and causality). Its output must equal ours; the bench checks it.
Both take topk_idx [Hkv, T, K] (block ids of one sequence) and return a BlockMask over Hq heads.
"""
from __future__ import annotations

import torch

__all__ = ["approx_block_mask", "exact_block_mask", "selected_blocks"]


def _expand_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """[Hkv, ...] -> [1, Hq, ...] int32 contiguous (BlockMask's [B, H, ...] index layout)."""
    return x.repeat_interleave(group, 0)[None].to(torch.int32).contiguous()


def selected_blocks(topk_idx: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """bool [Hkv, T, n_blocks]: block b selected by (group, query)."""
    hkv, t, _ = topk_idx.shape
    ids = topk_idx.long()
    sel = torch.zeros((hkv, t, n_blocks + 1), dtype=torch.bool, device=topk_idx.device)
    sel.scatter_(-1, torch.where(ids >= 0, ids, n_blocks), True)  # -1 -> the spare last column
    return sel[..., :n_blocks]


def approx_block_mask(topk_idx: torch.Tensor, seq_len: int, block_size: int, group: int):
    from torch.nn.attention.flex_attention import BlockMask

    nb = -(-seq_len // block_size)
    first = topk_idx[:, ::block_size].long()  # [Hkv, QB, K]: the selection of each tile's first query
    qb = torch.arange(nb, device=topk_idx.device)
    diag = first == qb[None, :, None]
    full_ids = torch.where((first >= 0) & (first < qb[None, :, None]), first, torch.full_like(first, nb))
    full_ids = full_ids.sort(-1).values
    dup = torch.zeros_like(full_ids, dtype=torch.bool)
    dup[..., 1:] = full_ids[..., 1:] == full_ids[..., :-1]
    full_ids = torch.where(dup, torch.full_like(full_ids, nb), full_ids).sort(-1).values
    n_full = (full_ids < nb).sum(-1)
    full_ids = torch.where(full_ids < nb, full_ids, torch.zeros_like(full_ids))
    full_ids = torch.nn.functional.pad(full_ids, (0, max(0, nb - full_ids.shape[-1])))[..., :nb]
    part_ids = torch.zeros_like(full_ids)
    part_ids[..., 0] = qb[None, :]
    n_part = torch.ones_like(n_full)
    del diag

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    mask = BlockMask.from_kv_blocks(_expand_heads(n_part, group), _expand_heads(part_ids, group),
                                    _expand_heads(n_full, group), _expand_heads(full_ids, group),
                                    BLOCK_SIZE=block_size, mask_mod=causal, seq_lengths=(seq_len, seq_len))
    # Pairs computed: full blocks x block_size^2 + the causal diagonal, per query head.
    pairs = (float(n_full.sum()) * block_size * block_size + nb * block_size * (block_size + 1) / 2) * group
    return mask, pairs


def exact_block_mask(topk_idx: torch.Tensor, seq_len: int, block_size: int, group: int):
    """(BlockMask, selected bool [Hkv, T, nb]) of the exact MSA op (keep ``selected`` alive: the
    mask_mod reads it)."""
    from torch.nn.attention.flex_attention import BlockMask

    hkv, t, _ = topk_idx.shape
    nb = -(-seq_len // block_size)
    sel = selected_blocks(topk_idx, nb)  # [Hkv, T, nb]
    pad = nb * block_size - t
    tiles = torch.nn.functional.pad(sel, (0, 0, 0, pad)) if pad else sel
    union = tiles.reshape(hkv, nb, block_size, nb).any(2)  # [Hkv, QB, nb]
    n_blocks = union.sum(-1)
    # Selected block ids first, ascending (stable sort of the negated mask).
    ids = torch.sort((~union).to(torch.int8), dim=-1, stable=True).indices

    def keep(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & sel[h // group, q_idx, kv_idx // block_size]

    mask = BlockMask.from_kv_blocks(_expand_heads(n_blocks, group), _expand_heads(ids, group),
                                    BLOCK_SIZE=block_size, mask_mod=keep, seq_lengths=(seq_len, seq_len))
    return mask, sel
