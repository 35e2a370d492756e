"""Exact PyTorch reference of sparse_attention (the oracle for attention/triton_fwd.py, triton_bwd.py).

Per fragment and query chunk it builds the masked fp32 score matrix [Hkv, G, chunk, key_len] of the
selected support, never T x T. Backward recomputes the chunk (flash-attention style) from the saved
inputs and the forward's lse.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Tuple

import torch

from .. import layout as _layout
from ..layout import Fragment, VarlenLayout

__all__ = ["sparse_attention_ref", "support_mask", "causal_mask", "check_topk_ids", "iter_chunks",
           "exact_fp32_matmul"]

_NEG_INF = float("-inf")


@contextlib.contextmanager
def exact_fp32_matmul(device: torch.device):
    """Keep the oracle's fp32 matmuls IEEE on CUDA even if the caller enabled TF32 (10-bit mantissa)."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32 = previous


def causal_mask(pos: torch.Tensor, key_len: int) -> torch.Tensor:
    """bool [c, Lk]: key position j is visible to the query at pos (j <= pos)."""
    return torch.arange(key_len, device=pos.device)[None, :] <= pos[:, None]


def support_mask(topk_idx: torch.Tensor, pos: torch.Tensor, key_len: int, block_size: int) -> torch.Tensor:
    """bool [Hkv, c, Lk]: S(i, r) = tokens j <= pos of the blocks in topk_idx [Hkv, c, k] (-1 ignored).

    key_len may stop short of the sequence (at the chunk's last position + 1): ids past it name blocks
    no query of the chunk can see, so they are dropped like -1.
    """
    hkv, c, _ = topk_idx.shape
    nb = -(-key_len // block_size)
    ids = topk_idx.long()
    ids = torch.where((ids < 0) | (ids >= nb), torch.full_like(ids, nb), ids)  # -> spare column, dropped
    picked = torch.zeros(hkv, c, nb + 1, dtype=torch.bool, device=topk_idx.device)
    picked.scatter_(-1, ids, True)
    tok = picked[..., :nb].repeat_interleave(block_size, dim=-1)[..., :key_len]  # [Hkv, c, Lk]
    return tok & causal_mask(pos, key_len)[None]


def check_topk_ids(topk_idx: torch.Tensor, layout: VarlenLayout, block_size: int) -> None:
    """Raise unless every id is -1 or a block of the query's own sequence (one host sync)."""
    if topk_idx.numel() == 0:
        return
    nb = layout.num_blocks(block_size).to(torch.int64)
    limit = torch.repeat_interleave(nb, layout.q_lens.to(torch.int64), output_size=layout.total_q)  # [T]
    bad = (topk_idx < -1) | (topk_idx.long() >= limit[None, :, None])
    if bool(bad.any()):
        h, i, s = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"topk_idx[{h}, {i}, {s}] = {int(topk_idx[h, i, s])} is not -1 or a block id of its sequence "
            f"(block_size={block_size}); check topk_idx, block_size and cu_seqlens/key_lens")


def iter_chunks(layout: VarlenLayout, heads: int) -> Iterator[Tuple[Fragment, slice, slice, torch.Tensor]]:
    """(fragment, query rows, key rows, positions [c] int64) for every query chunk of every fragment.

    The key rows stop at the chunk's last visible position: later keys are masked for every query of
    the chunk, so leaving them out is exact and halves the causal work.
    """
    for frag in layout:
        if frag.q_len == 0:
            continue
        for a, b in _layout.query_chunks(frag, heads * max(frag.k_len, 1), layout.device):
            pos = torch.arange(frag.pos_offset + a, frag.pos_offset + b, device=layout.device,
                               dtype=torch.int64)
            keys = slice(frag.k_start, frag.k_start + frag.pos_offset + b)
            yield frag, slice(frag.q_start + a, frag.q_start + b), keys, pos


def _scores(qc: torch.Tensor, kc: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """qc [c, Hkv, G, D], kc [Lk, Hkv, D], mask [Hkv, c, Lk] -> masked fp32 [Hkv, G, c, Lk]."""
    s = torch.einsum("crgd,jrd->rgcj", qc, kc) * scale
    return s.masked_fill(~mask[:, None], _NEG_INF)


def _probs(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(s - lse) with empty rows (lse = -inf) giving 0 instead of NaN. lse [Hkv, G, c]."""
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(s - safe[..., None])


def _forward_chunk(q, k, v, topk_idx, rows, keys, pos, block_size, scale):
    """-> (out [c, Hq, Dv] fp32, lse [c, Hq] fp32) of one query chunk."""
    c, hq, d = rows.stop - rows.start, q.shape[1], q.shape[2]
    hkv = k.shape[1]
    qc = q[rows].float().view(c, hkv, hq // hkv, d)  # [c, Hkv, G, D]
    mask = support_mask(topk_idx[:, rows], pos, keys.stop - keys.start, block_size)
    s = _scores(qc, k[keys].float(), mask, scale)  # [Hkv, G, c, Lk]
    lse = torch.logsumexp(s, dim=-1)  # [Hkv, G, c]; -inf for an empty support
    out = torch.einsum("rgcj,jrd->crgd", _probs(s, lse), v[keys].float())  # [c, Hkv, G, Dv]
    return out.reshape(c, hq, -1), lse.permute(2, 0, 1).reshape(c, hq)


def _backward_chunk(q, k, v, topk_idx, lse, dout, dlse, rows, keys, pos, block_size, scale, dq, dk, dv):
    """Accumulate one query chunk's dq (rows), dk and dv (key rows) into fp32 buffers."""
    c, hq, d = rows.stop - rows.start, q.shape[1], q.shape[2]
    hkv = k.shape[1]
    g = hq // hkv
    qc = q[rows].float().view(c, hkv, g, d)
    kc, vc = k[keys].float(), v[keys].float()
    do = dout[rows].float().view(c, hkv, g, -1)  # [c, Hkv, G, Dv]
    l = lse[rows].view(c, hkv, g).permute(1, 2, 0)  # [Hkv, G, c]
    mask = support_mask(topk_idx[:, rows], pos, keys.stop - keys.start, block_size)
    p = _probs(_scores(qc, kc, mask, scale), l)  # [Hkv, G, c, Lk]
    dp = torch.einsum("crgd,jrd->rgcj", do, vc)
    # d lse_i / d s_ij = p_ij, so an upstream lse gradient adds p * dlse.
    row_term = (p * dp).sum(-1) - dlse[rows].float().view(c, hkv, g).permute(1, 2, 0)
    ds = p * (dp - row_term[..., None])  # [Hkv, G, c, Lk]
    dq[rows] = torch.einsum("rgcj,jrd->crgd", ds, kc).reshape(c, hq, d) * scale
    dk[keys] += torch.einsum("rgcj,crgd->jrd", ds, qc) * scale
    dv[keys] += torch.einsum("rgcj,crgd->jrd", p, do)


class _SparseAttentionRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, topk_idx, layout: VarlenLayout, block_size: int, scale: float):
        t, hq, _ = q.shape
        # empty, not zeros: every row belongs to a fragment, and the NaN-poisoning tests prove it.
        out = torch.empty(t, hq, v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(t, hq, dtype=torch.float32, device=q.device)
        with exact_fp32_matmul(q.device):
            for _, rows, keys, pos in iter_chunks(layout, hq):
                o, l = _forward_chunk(q, k, v, topk_idx, rows, keys, pos, block_size, scale)
                out[rows], lse[rows] = o.to(q.dtype), l
        ctx.save_for_backward(q, k, v, topk_idx, lse)
        ctx.layout, ctx.block_size, ctx.scale = layout, block_size, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, topk_idx, lse = ctx.saved_tensors
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        with exact_fp32_matmul(q.device):
            for _, rows, keys, pos in iter_chunks(ctx.layout, q.shape[1]):
                _backward_chunk(q, k, v, topk_idx, lse, dout, dlse, rows, keys, pos, ctx.block_size,
                                ctx.scale, dq, dk, dv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def sparse_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk_idx: torch.Tensor,
                         layout: VarlenLayout, *, block_size: int, scale: float,
                         deterministic: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference sparse_attention (always deterministic): -> (out [T, Hq, D] q.dtype, lse [T, Hq] fp32)."""
    del deterministic  # the reference has no atomics
    check_topk_ids(topk_idx, layout, block_size)
    return _SparseAttentionRef.apply(q, k, v, topk_idx, layout, block_size, scale)
