"""Hand-placed selection patterns (sliding / random / mix) for the gpu_check scripts' parity cases.

The benchmark itself does not use them: its selections come from select_blocks on index vectors
(selections.py), so no pattern is chosen to suit the kernels.
  sliding  the K most recent blocks
  random   the local block + K-1 distinct random visible blocks per (group, token)
  mix      local + 2 previous blocks + block 0 + K-4 long-range blocks shared by the group's tokens
           of each 1024-token window
"""
from __future__ import annotations

import torch

__all__ = ["PATTERNS", "make_pattern", "sparse_pairs"]

PATTERNS = ("sliding", "random", "mix")


def make_pattern(name: str, seq_len: int, hkv: int, topk: int, block_size: int, device, seed: int = 0,
                 chunk: int = 8192) -> torch.Tensor:
    """int32 [Hkv, T, topk] selection of pattern ``name`` for one sequence of ``seq_len`` tokens."""
    if name not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {name!r}")
    gen = torch.Generator(device=device).manual_seed(seed)
    nb = -(-seq_len // block_size)
    out = torch.empty((hkv, seq_len, topk), dtype=torch.int32, device=device)
    window_blocks = max(1, 1024 // block_size)
    n_windows = -(-nb // window_blocks)
    shared = None
    if name == "mix":
        n_long = max(0, topk - 4)
        w_first = torch.arange(n_windows, device=device) * window_blocks  # first block of each window
        cols = torch.arange(nb, device=device)
        ok = (cols[None, :] >= 1) & (cols[None, :] < w_first[:, None] - 2)  # visible to the whole window
        sc = torch.rand((hkv, n_windows, nb), generator=gen, device=device)
        sc = torch.where(ok[None], sc, torch.full_like(sc, -1.0))
        kk = min(n_long, nb)
        s_val, s_idx = torch.topk(sc, kk, dim=-1) if kk else (sc[..., :0], sc[..., :0].long())
        shared = torch.where(s_val >= 0, s_idx, torch.full_like(s_idx, -1))  # [Hkv, W, n_long]
    for a in range(0, seq_len, chunk):
        b = min(seq_len, a + chunk)
        pos = torch.arange(a, b, device=device)
        own = pos // block_size  # [c]
        if name == "sliding":
            offs = torch.arange(topk - 1, 0, -1, device=device)  # oldest first
            others = own[None, :, None] - offs[None, None, :]
            others = torch.where(others >= 0, others, torch.full_like(others, -1)).expand(hkv, -1, -1)
        elif name == "random":
            sc = torch.rand((hkv, b - a, nb), generator=gen, device=device)
            cols = torch.arange(nb, device=device)
            sc = torch.where(cols[None, None, :] < own[None, :, None], sc, torch.full_like(sc, -1.0))
            kk = min(topk - 1, nb)
            s_val, s_idx = torch.topk(sc, kk, dim=-1)
            others = torch.where(s_val >= 0, s_idx, torch.full_like(s_idx, -1))
        else:
            win = own // window_blocks
            long_ = shared[:, win]  # [Hkv, c, n_long]
            near = torch.stack([torch.zeros_like(own), own - 2, own - 1], dim=-1)  # [c, 3]
            keep = torch.stack([own >= 1, own - 2 >= 1, own - 1 >= 1], dim=-1)  # sink, then distinct neighbours
            near = torch.where(keep, near, torch.full_like(near, -1))
            others = torch.cat([long_, near[None].expand(hkv, -1, -1)], dim=-1)[..., : topk - 1]
        others = others.to(torch.int64)
        # valid ids first (stable), then the local block right after them
        order = torch.sort((others < 0).to(torch.int8), dim=-1, stable=True).indices
        others = torch.gather(others, -1, order)
        n_valid = (others >= 0).sum(-1, keepdim=True)
        sel = torch.full((hkv, b - a, topk), -1, dtype=torch.int64, device=device)
        sel[..., : topk - 1] = others
        sel.scatter_(-1, n_valid, own[None, :, None].expand(hkv, -1, 1))
        out[:, a:b] = sel.to(torch.int32)
    return out


def sparse_pairs(topk_idx: torch.Tensor, block_size: int) -> torch.Tensor:
    """float64 [Hkv, T]: causally visible keys in each (group, token)'s selected blocks (one sequence)."""
    t = topk_idx.shape[1]
    pos = torch.arange(t, device=topk_idx.device)
    own = (pos // block_size)[None, :, None]
    ids = topk_idx.long()
    full = torch.where(ids < own, block_size, (pos % block_size + 1)[None, :, None].expand_as(ids))
    return torch.where(ids >= 0, full, torch.zeros_like(full)).sum(-1).double()
