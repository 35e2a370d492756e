"""Independent float64 brute-force indexer KL, written from docs/MSA.md only (no msa_kernels code).

Materializes the full [T, T] score matrices, so it is for tiny T only. Everything is differentiable
in float64, so autograd through it is the exact gradient the kernels must reproduce.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def support_mask(seqlens: Sequence[int], hkv: int, topk_idx: torch.Tensor | None = None,
                 block_size: int | None = None) -> torch.Tensor:
    """bool [Hkv, T, T]: key j is in the support of (query i, group r).

    Causal within each packed sequence; with topk_idx (int [Hkv, T, k], -1 = unused) also only
    keys of the selected blocks (block ids local to the sequence).
    """
    total = int(sum(seqlens))
    mask = torch.zeros(hkv, total, total, dtype=torch.bool)
    start = 0
    for n in seqlens:
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        if topk_idx is not None:
            ids = topk_idx[:, start:start + n].long()  # [Hkv, n, k]
            key_block = torch.arange(n) // block_size  # [n]
            picked = (ids[..., None] == key_block).any(dim=2)  # [Hkv, n, n]
            mask[:, start:start + n, start:start + n] = causal & picked
        else:
            mask[:, start:start + n, start:start + n] = causal
        start += n
    return mask


def teacher_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, Hq, D], k [T, Hkv, D] -> P [Hkv, T, T]: the group's mean over its G heads of the
    main-branch softmax restricted to the support (probabilities averaged, not logits)."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    logits = torch.einsum("irgd,jrd->rgij", q.double().view(t, hkv, g, d), k.double()) * scale
    logits = logits.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # empty rows -> 0
    return probs.mean(dim=1)


def student_log_probs(q_idx: torch.Tensor, k_idx: torch.Tensor, mask: torch.Tensor,
                      index_scale: float) -> torch.Tensor:
    """q_idx [T, Hkv, Di], k_idx [T, Di] -> log Q [Hkv, T, T] (-inf off the support)."""
    logits = torch.einsum("ird,jd->rij", q_idx.double(), k_idx.double()) * index_scale
    return torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)


def kl_rows(p: torch.Tensor, log_q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per (group, query) [Hkv, T]; 0 for empty supports."""
    safe_log_q = torch.where(mask, log_q, torch.zeros((), dtype=log_q.dtype))
    terms = torch.xlogy(p, p) - p * safe_log_q
    return torch.where(mask, terms, torch.zeros((), dtype=terms.dtype)).sum(dim=-1)


def indexer_kl(q, k, q_idx, k_idx, mask, scale: float, index_scale: float) -> torch.Tensor:
    """Mean over (token, group) of KL(P || Q), float64 scalar, differentiable in q_idx / k_idx."""
    p = teacher_probs(q, k, mask, scale).detach()
    return kl_rows(p, student_log_probs(q_idx, k_idx, mask, index_scale), mask).mean()


def index_projections(x: torch.Tensor, w_qi: torch.Tensor, w_ki: torch.Tensor, hkv: int):
    """x [s, b, h] (Megatron layout), W_qi [Hkv*Di, h], W_ki [Di, h] -> packed
    q_idx [b*s, Hkv, Di], k_idx [b*s, Di] (sequence-major, like msa_train.model.packing)."""
    s, b, h = x.shape
    xp = x.double().transpose(0, 1).reshape(b * s, h)  # [T, h]
    q_idx = (xp @ w_qi.double().t()).view(b * s, hkv, -1)
    k_idx = xp @ w_ki.double().t()
    return q_idx, k_idx


def pack(x: torch.Tensor) -> torch.Tensor:
    """Megatron [s, b, H, D] -> packed [b*s, H, D]."""
    s, b = x.shape[0], x.shape[1]
    return x.transpose(0, 1).reshape(b * s, *x.shape[2:])
