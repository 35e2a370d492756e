"""Exact PyTorch reference of indexer_kl and indexer_kl_dense (the oracle for kl/triton.py).

Per query chunk: teacher P [Hkv, c, Lk] = mean over the G heads of exp(q.k * scale - lse) on the support
(detached); student log Q = index logits - logsumexp over the same support; KL row = sum_j P (log P -
log Q). Backward recomputes the chunk; the student-logit gradient is Q * sum_j P - P (= Q - P when the
teacher is normalized, i.e. lse is consistent with q, k and the support).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..attention.naive import (
    causal_mask,
    check_topk_ids,
    exact_fp32_matmul,
    iter_chunks,
    support_mask,
)
from ..layout import VarlenLayout

__all__ = ["indexer_kl_ref", "indexer_kl_dense_ref"]


def _chunk_terms(q, k, lse, q_idx, k_idx, topk_idx, rows: slice, keys: slice, pos: torch.Tensor,
                 block_size: Optional[int], scale: float, index_scale: float, want_grad: bool
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """KL per (group, query) [Hkv, c] and, if asked, d KL / d index-logits [Hkv, c, Lk] of one chunk."""
    c = rows.stop - rows.start
    lk = keys.stop - keys.start
    hq, d = q.shape[1], q.shape[2]
    hkv = k.shape[1]
    g = hq // hkv
    if topk_idx is None:  # dense warmup: support = full causal context
        mask = causal_mask(pos, lk)[None].expand(hkv, c, lk)
    else:
        mask = support_mask(topk_idx[:, rows], pos, lk, block_size)  # [Hkv, c, Lk]

    qc = q[rows].float().view(c, hkv, g, d)
    s = torch.einsum("crgd,jrd->rgcj", qc, k[keys].float()) * scale  # [Hkv, G, c, Lk]
    s = s.masked_fill(~mask[:, None], float("-inf"))
    if lse is None:
        l = torch.logsumexp(s, dim=-1)  # [Hkv, G, c]
    else:
        l = lse[rows].float().view(c, hkv, g).permute(1, 2, 0)
    l = torch.where(torch.isinf(l), torch.zeros_like(l), l)  # empty support: all p are 0 anyway
    p = torch.where(mask, torch.exp(s - l[..., None]).mean(dim=1), torch.zeros((), device=q.device))

    t_logit = torch.einsum("crd,jd->rcj", q_idx[rows].float(), k_idx[keys].float()) * index_scale
    t_logit = t_logit.masked_fill(~mask, float("-inf"))  # [Hkv, c, Lk]
    t_lse = torch.logsumexp(t_logit, dim=-1, keepdim=True)
    t_lse = torch.where(torch.isinf(t_lse), torch.zeros_like(t_lse), t_lse)
    log_q = torch.where(mask, t_logit - t_lse, torch.zeros((), device=q.device))
    kl = (torch.xlogy(p, p) - p * log_q).sum(dim=-1)  # [Hkv, c]
    if not want_grad:
        return kl, None
    qs = torch.where(mask, torch.exp(log_q), torch.zeros((), device=q.device))
    return kl, qs * p.sum(dim=-1, keepdim=True) - p


class _IndexerKLRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, lse, q_idx, k_idx, topk_idx, layout: VarlenLayout, block_size, scale,
                index_scale, reduction):
        total = torch.zeros((), dtype=torch.float64, device=q.device)
        with exact_fp32_matmul(q.device):
            for _, rows, keys, pos in iter_chunks(layout, q.shape[1]):
                kl, _ = _chunk_terms(q, k, lse, q_idx, k_idx, topk_idx, rows, keys, pos, block_size,
                                     scale, index_scale, want_grad=False)
                total += kl.sum(dtype=torch.float64)
        norm = _norm(layout, k.shape[1], reduction)
        ctx.save_for_backward(q, k, lse, q_idx, k_idx, topk_idx)
        ctx.args = (layout, block_size, scale, index_scale, norm)
        return (total * norm).to(torch.float32)

    @staticmethod
    def backward(ctx, grad):
        q, k, lse, q_idx, k_idx, topk_idx = ctx.saved_tensors
        layout, block_size, scale, index_scale, norm = ctx.args
        dq_idx = torch.zeros(q_idx.shape, dtype=torch.float32, device=q_idx.device)
        dk_idx = torch.zeros(k_idx.shape, dtype=torch.float32, device=k_idx.device)
        coef = grad.float() * (norm * index_scale)
        with exact_fp32_matmul(q.device):
            for _, rows, keys, pos in iter_chunks(layout, q.shape[1]):
                _, dt = _chunk_terms(q, k, lse, q_idx, k_idx, topk_idx, rows, keys, pos, block_size,
                                     scale, index_scale, want_grad=True)  # [Hkv, c, Lk]
                dq_idx[rows] = torch.einsum("rcj,jd->crd", dt, k_idx[keys].float()) * coef
                dk_idx[keys] += torch.einsum("rcj,crd->jd", dt, q_idx[rows].float()) * coef
        # Teacher inputs (q, k, lse) are detached by definition: no gradient.
        return (None, None, None, dq_idx.to(q_idx.dtype), dk_idx.to(k_idx.dtype),
                None, None, None, None, None, None)


def _norm(layout: VarlenLayout, hkv: int, reduction: str) -> float:
    if reduction == "sum":
        return 1.0
    return 1.0 / max(1, layout.total_q * hkv)


def indexer_kl_ref(q, k, lse, q_idx, k_idx, topk_idx, layout: VarlenLayout, *, block_size: int,
                   scale: float, index_scale: float, reduction: str = "mean",
                   deterministic: bool = False) -> torch.Tensor:
    """Reference indexer_kl on the selected support -> fp32 scalar; grads to q_idx, k_idx only."""
    del deterministic  # the reference has no atomics
    check_topk_ids(topk_idx, layout, block_size)
    return _IndexerKLRef.apply(q.detach(), k.detach(), lse.detach(), q_idx, k_idx, topk_idx, layout,
                               block_size, scale, index_scale, reduction)


def indexer_kl_dense_ref(q, k, q_idx, k_idx, layout: VarlenLayout, *, scale: float, index_scale: float,
                         lse: Optional[torch.Tensor] = None, reduction: str = "mean",
                         deterministic: bool = False) -> torch.Tensor:
    """Reference warmup KL over the full causal context -> fp32 scalar; grads to q_idx, k_idx only."""
    del deterministic
    return _IndexerKLRef.apply(q.detach(), k.detach(), None if lse is None else lse.detach(), q_idx,
                               k_idx, None, layout, None, scale, index_scale, reduction)
