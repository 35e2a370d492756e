"""Selection families of the benchmark and the statistics that explain their speed.

Every family produces index vectors (q_idx [T, Hkv, Di], k_idx [Tk, Di]); the selection the kernels
run on is what ``msa_kernels.select_blocks`` picks from them, so the bench never hand-places blocks:
  random            i.i.d. Gaussian index vectors: no two queries agree beyond chance.
  smooth:W:N        locality knob: each run of W consecutive queries shares one index query plus
                    noise of relative size N (keys i.i.d.); small N or large W -> neighbouring queries
                    pick the same blocks -> a small union of blocks per query tile.
  recorded[:PATH]   index vectors dumped from a trained checkpoint (tools/record_selection.py),
                    stretched in time to the bench length, heads cycled, Di zero-padded (the ranking
                    is unchanged by padding and by positive scale).
The union of blocks that the queries of one 128-query tile selected (mean, p90) is reported with
every timing: the sparse kernels' work per tile grows with it, so speed reads as a function of overlap.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = ["Family", "parse_family", "index_vectors", "union_sizes", "union_summary", "visible_pairs",
           "causal_pairs", "RECORDED_DEFAULT", "load_recorded"]

RECORDED_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "recorded_tiny_cpu.pt")


@dataclass(frozen=True)
class Family:
    kind: str  # random | smooth | recorded
    window: int = 256
    noise: float = 0.5
    path: Optional[str] = None

    @property
    def name(self) -> str:
        if self.kind == "smooth":
            return f"smooth:{self.window}:{self.noise:g}"
        if self.kind == "recorded" and self.path and self.path != RECORDED_DEFAULT:
            return f"recorded:{os.path.basename(self.path)}"
        return self.kind


def parse_family(spec: str) -> Family:
    """'random' | 'smooth[:WINDOW[:NOISE]]' | 'recorded[:PATH]' -> Family (errors name the fix)."""
    kind, _, rest = spec.strip().partition(":")
    if kind == "random" and not rest:
        return Family("random")
    if kind == "smooth":
        parts = [p for p in rest.split(":") if p] if rest else []
        try:
            window = int(parts[0]) if parts else 256
            noise = float(parts[1]) if len(parts) > 1 else 0.5
        except ValueError:
            raise ValueError(f"selection family {spec!r}: write smooth:WINDOW:NOISE, e.g. smooth:256:0.5") from None
        if window < 1 or not noise >= 0 or len(parts) > 2:
            raise ValueError(f"selection family {spec!r}: WINDOW must be >= 1 and NOISE >= 0 (smooth:256:0.5)")
        return Family("smooth", window=window, noise=noise)
    if kind == "recorded":
        return Family("recorded", path=rest or RECORDED_DEFAULT)
    raise ValueError(f"unknown selection family {spec!r}: use random, smooth:WINDOW:NOISE or recorded[:PATH]")


def load_recorded(path: str) -> dict:
    """A file written by tools/record_selection.py: q_idx [L, H, Di], k_idx [L, Di] (+ metadata)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no recorded selection at {path}: write one with tools/record_selection.py")
    rec = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("q_idx", "k_idx"):
        if key not in rec:
            raise ValueError(f"{path} has no {key!r}: write it with tools/record_selection.py")
    return rec


def index_vectors(family: Family, t: int, hkv: int, di: int, device, seed: int = 0,
                  dtype=torch.bfloat16) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q_idx [T, Hkv, Di], k_idx [T, Di]) of one sequence (or pack) of T tokens for ``family``."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=g, device=device, dtype=torch.float32)

    if family.kind == "random":
        q, k = randn(t, hkv, di), randn(t, di)
    elif family.kind == "smooth":
        n_win = -(-t // family.window)
        base = randn(n_win, hkv, di)
        win = torch.arange(t, device=device) // family.window
        q = base[win] + family.noise * randn(t, hkv, di)
        k = randn(t, di)
    elif family.kind == "recorded":
        rec = load_recorded(family.path)
        q_rec, k_rec = rec["q_idx"].float().to(device), rec["k_idx"].float().to(device)
        length, h_rec, di_rec = q_rec.shape
        if di_rec > di:
            raise ValueError(f"recorded Di={di_rec} exceeds the bench's index dim {di}: pass --index-dim >= {di_rec}")
        src = (torch.arange(t, device=device) * length) // t  # time stretch: bench token -> recorded token
        heads = torch.arange(hkv, device=device) % h_rec
        q = torch.zeros(t, hkv, di, device=device)
        k = torch.zeros(t, di, device=device)
        q[..., :di_rec] = q_rec[src][:, heads]
        k[:, :di_rec] = k_rec[src]
        # Tokens stretched from one recorded token are identical; a small jitter breaks the exact
        # ties between their blocks without changing which recorded blocks win.
        q[..., :di_rec] += 1e-3 * q_rec.std() * randn(t, hkv, di_rec)
        k[:, :di_rec] += 1e-3 * k_rec.std() * randn(t, di_rec)
    else:
        raise ValueError(f"unknown family kind {family.kind!r}")
    return q.to(dtype), k.to(dtype)


def _block_rows(topk_idx: torch.Tensor, layout, block_size: int) -> torch.Tensor:
    """int64 [Hkv, T, K]: absolute key row of each selected block (-1 unused): unique across sequences."""
    frag = layout.token_fragment().to(torch.int64)
    ids = topk_idx.to(torch.int64)
    rows = layout.k_starts[frag][None, :, None] + ids * block_size
    return torch.where(ids >= 0, rows, torch.full_like(rows, -1))


def union_sizes(topk_idx: torch.Tensor, layout, block_size: int, tile: int = 128) -> torch.Tensor:
    """int64 [Hkv, ceil(T / tile)]: distinct blocks selected by the queries of each tile of ``tile``
    consecutive query rows (per group), i.e. the blocks a query-tile kernel must visit."""
    rows = _block_rows(topk_idx, layout, block_size)
    hkv, t, k = rows.shape
    n_tiles = -(-t // tile)
    pad = n_tiles * tile - t
    if pad:
        rows = torch.nn.functional.pad(rows, (0, 0, 0, pad), value=-1)
    srt = rows.reshape(hkv, n_tiles, tile * k).sort(-1).values
    new = srt >= 0
    new[..., 1:] &= srt[..., 1:] != srt[..., :-1]
    return new.sum(-1)


def union_summary(sizes: torch.Tensor) -> dict:
    """{'mean', 'p90'} of union sizes (floats)."""
    s = sizes.double().reshape(-1)
    if s.numel() == 0:
        return {"mean": 0.0, "p90": 0.0}
    return {"mean": float(s.mean()), "p90": float(torch.quantile(s, 0.9))}


def visible_pairs(topk_idx: torch.Tensor, layout, block_size: int) -> torch.Tensor:
    """float64 [Hkv, T]: keys each (group, query) attends to (its selected blocks, causally visible)."""
    pos = layout.token_positions().to(torch.int64)  # [T] position in its key sequence
    own = (pos // block_size)[None, :, None]
    ids = topk_idx.to(torch.int64)
    part = (pos % block_size + 1)[None, :, None].expand_as(ids)
    # Duplicate ids count once, like the kernels.
    srt = ids.sort(-1).values
    dup = torch.zeros_like(srt, dtype=torch.bool)
    dup[..., 1:] = srt[..., 1:] == srt[..., :-1]
    full = torch.where(srt < own, torch.full_like(srt, block_size), torch.where(srt == own, part, 0))
    return torch.where((srt >= 0) & ~dup, full, torch.zeros_like(full)).sum(-1).double()


def causal_pairs(layout) -> float:
    """Query-key pairs of dense causal attention over the layout (sum over queries of position + 1)."""
    return float((layout.token_positions().to(torch.float64) + 1).sum())
