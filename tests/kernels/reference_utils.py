"""Brute-force MSA formulas and helpers shared by the kernel tests.

Everything here is written independently of msa_kernels' chunked code: full T x Tk masks, float64,
plain torch autograd, Python loops for the ranking. Use it on tiny inputs only.
"""
from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = [
    "cu_seqlens_of", "fragments", "visible_mask", "key_block_ids", "selection_mask",
    "brute_block_scores", "brute_select", "brute_attention", "brute_kl", "brute_kl_dense",
    "random_topk", "zigzag_rank", "assert_same_selection", "poison_allocations", "assert_close",
]


def cu_seqlens_of(lens: Sequence[int], device="cpu") -> torch.Tensor:
    """int32 [B+1] offsets of packed sequences with the given lengths."""
    out = [0]
    for n in lens:
        out.append(out[-1] + int(n))
    return torch.tensor(out, dtype=torch.int32, device=device)


def fragments(cu_seqlens, key_starts=None, key_lens=None) -> List[Tuple[int, int, int, int]]:
    """[(q_start, q_len, k_start, k_len)] per fragment; default keys = the queries' own rows."""
    cu = [int(x) for x in cu_seqlens.tolist()]
    frags = []
    for f in range(len(cu) - 1):
        qs, ql = cu[f], cu[f + 1] - cu[f]
        if key_starts is None:
            frags.append((qs, ql, qs, ql))
        else:
            frags.append((qs, ql, int(key_starts[f]), int(key_lens[f])))
    return frags


def visible_mask(cu_seqlens, total_keys: int, key_starts=None, key_lens=None) -> torch.Tensor:
    """bool [T, Tk]: key row j is in query row i's sequence at a position <= i's (bottom-right aligned)."""
    frags = fragments(cu_seqlens, key_starts, key_lens)
    t = frags[-1][0] + frags[-1][1] if frags else 0
    mask = torch.zeros(t, total_keys, dtype=torch.bool)
    for qs, ql, ks, kl in frags:
        for i in range(ql):
            pos = kl - ql + i
            mask[qs + i, ks:ks + pos + 1] = True
    return mask


def key_block_ids(cu_seqlens, total_keys: int, block_size: int, key_starts=None, key_lens=None) -> torch.Tensor:
    """int64 [T, Tk]: block id of key row j inside query row i's sequence, -1 outside the sequence."""
    frags = fragments(cu_seqlens, key_starts, key_lens)
    t = frags[-1][0] + frags[-1][1] if frags else 0
    ids = torch.full((t, total_keys), -1, dtype=torch.int64)
    for qs, ql, ks, kl in frags:
        ids[qs:qs + ql, ks:ks + kl] = torch.arange(kl) // block_size
    return ids


def selection_mask(topk_idx, cu_seqlens, total_keys: int, block_size: int, key_starts=None,
                   key_lens=None) -> torch.Tensor:
    """bool [Hkv, T, Tk]: S(i, r) = visible keys whose block is listed in topk_idx[r, i]."""
    vis = visible_mask(cu_seqlens, total_keys, key_starts, key_lens)
    blk = key_block_ids(cu_seqlens, total_keys, block_size, key_starts, key_lens)
    sel = topk_idx.cpu().long()
    hit = (blk[None, :, :, None] == sel[:, :, None, :]) & (sel[:, :, None, :] >= 0)
    return hit.any(-1) & vis[None]


def brute_block_scores(q_idx, k_idx, cu_seqlens, block_size: int, index_scale=None, key_starts=None,
                       key_lens=None) -> torch.Tensor:
    """float64 [Hkv, T, nb_max] causal block-max index scores (-inf for invisible blocks)."""
    q_idx, k_idx = q_idx.detach().cpu().double(), k_idx.detach().cpu().double()
    scale = q_idx.shape[-1] ** -0.5 if index_scale is None else index_scale
    s = torch.einsum("trd,jd->rtj", q_idx, k_idx) * scale
    vis = visible_mask(cu_seqlens, k_idx.shape[0], key_starts, key_lens)
    blk = key_block_ids(cu_seqlens, k_idx.shape[0], block_size, key_starts, key_lens)
    nb = max(1, max((-(-kl // block_size) for _, _, _, kl in fragments(cu_seqlens, key_starts, key_lens)),
                    default=1))
    out = torch.full((s.shape[0], s.shape[1], nb), float("-inf"), dtype=torch.float64)
    if k_idx.shape[0] == 0:
        return out
    for b in range(nb):
        m = vis & (blk == b)
        out[..., b] = s.masked_fill(~m[None], float("-inf")).amax(-1)
    return out


def brute_select(q_idx, k_idx, cu_seqlens, block_size: int, topk: int, index_scale=None, key_starts=None,
                 key_lens=None, force_sink: bool = False, local_window: int = 0) -> torch.Tensor:
    """int32 [Hkv, T, topk] by the spec, one (group, token) at a time."""
    scores = brute_block_scores(q_idx, k_idx, cu_seqlens, block_size, index_scale, key_starts, key_lens)
    hkv, t, _ = scores.shape
    out = torch.full((hkv, t, topk), -1, dtype=torch.int32)
    for qs, ql, _, kl in fragments(cu_seqlens, key_starts, key_lens):
        for i in range(ql):
            local = (kl - ql + i) // block_size
            for r in range(hkv):
                row_scores = scores[r, qs + i].tolist()

                def priority(b, local=local, row_scores=row_scores):
                    if force_sink and b == 0:
                        return (0, 0.0, b)
                    if 1 <= local - b <= local_window:
                        return (local - b, 0.0, b)
                    return (local_window + 1, -row_scores[b], b)
                others = sorted(range(local), key=priority)[:topk - 1]
                row = others + [local]
                out[r, qs + i, :len(row)] = torch.tensor(row, dtype=torch.int32)
    return out


def _masked_lse(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(s.masked_fill(~mask, float("-inf")), dim=-1)


def _masked_softmax(s: torch.Tensor, mask: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    # Mask before exp so off-support entries are exp(-inf) = 0 with a zero (not NaN) gradient.
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(s.masked_fill(~mask, float("-inf")) - safe[..., None])


def brute_attention(q, k, v, mask, scale=None):
    """(out [T, Hq, D], lse [T, Hq]) in float64 with autograd; mask bool [Hkv, T, Tk] (any support)."""
    hq, d = q.shape[1], q.shape[2]
    hkv = k.shape[1]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    head_mask = mask.repeat_interleave(g, dim=0)  # [Hq, T, Tk]: head h -> group h // G
    kk = k.double().repeat_interleave(g, dim=1)
    vv = v.double().repeat_interleave(g, dim=1)
    s = torch.einsum("thd,jhd->htj", q.double(), kk) * scale
    lse = _masked_lse(s, head_mask)
    p = _masked_softmax(s, head_mask, lse)
    out = torch.einsum("htj,jhd->thd", p, vv)
    return out, lse.transpose(0, 1)


def brute_kl(q, k, lse, q_idx, k_idx, mask, scale=None, index_scale=None, reduction="mean"):
    """float64 KL(P || Q) on the support mask [Hkv, T, Tk]; teacher from q, k, lse (detached)."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    index_scale = q_idx.shape[-1] ** -0.5 if index_scale is None else index_scale
    head_mask = mask.repeat_interleave(g, dim=0)
    s = torch.einsum("thd,jhd->htj", q.detach().double(), k.detach().double().repeat_interleave(g, dim=1))
    p_head = _masked_softmax(s * scale, head_mask, lse.detach().double().transpose(0, 1))  # [Hq, T, Tk]
    p = p_head.view(hkv, g, t, -1).mean(1)  # [Hkv, T, Tk]
    logits = torch.einsum("trd,jd->rtj", q_idx.double(), k_idx.double()) * index_scale
    logits = logits.masked_fill(~mask, float("-inf"))
    lse_i = torch.logsumexp(logits, -1, keepdim=True)
    log_q = torch.where(mask, logits - torch.where(torch.isinf(lse_i), torch.zeros_like(lse_i), lse_i),
                        torch.zeros((), dtype=torch.float64))
    total = (torch.xlogy(p, p) - p * log_q).sum()
    return total if reduction == "sum" else total / (t * hkv)


def brute_kl_dense(q, k, q_idx, k_idx, cu_seqlens, scale=None, index_scale=None, key_starts=None,
                   key_lens=None, reduction="mean"):
    """Warmup KL: support = all visible keys, teacher lse from full causal attention."""
    vis = visible_mask(cu_seqlens, k.shape[0], key_starts, key_lens)
    mask = vis[None].expand(k.shape[1], -1, -1)
    _, lse = brute_attention(q.detach(), k.detach(), k.detach(), mask, scale)
    return brute_kl(q, k, lse, q_idx, k_idx, mask, scale, index_scale, reduction)


def random_topk(cu_seqlens, hkv: int, block_size: int, topk: int, *, generator=None, key_starts=None,
                key_lens=None, p_drop: float = 0.3, p_empty: float = 0.0) -> torch.Tensor:
    """int32 [Hkv, T, topk] random distinct visible blocks per row, some slots -1, optional empty rows.

    Not a valid select_blocks output (local block may be missing): the attention and KL ops must
    handle any id set, so they are tested on these too.
    """
    frags = fragments(cu_seqlens, key_starts, key_lens)
    t = frags[-1][0] + frags[-1][1]
    out = torch.full((hkv, t, topk), -1, dtype=torch.int32)
    for qs, ql, _, kl in frags:
        for i in range(ql):
            nvis = (kl - ql + i) // block_size + 1
            for r in range(hkv):
                if torch.rand((), generator=generator) < p_empty:
                    continue
                ids = torch.randperm(nvis, generator=generator)[:topk]
                keep = torch.rand(len(ids), generator=generator) >= p_drop
                keep[0] = True
                ids = ids[keep]
                slots = torch.randperm(topk, generator=generator)[:len(ids)]
                out[r, qs + i, slots] = ids.to(torch.int32)
    return out


def zigzag_rank(lens: Sequence[int], cp: int, rank: int):
    """Context-parallel zigzag split of packed sequences (each length divisible by 2*cp).

    Returns (rows int64 [T_rank] query rows of the full packing held by this rank, cu_seqlens,
    key_starts, key_lens) for the rank's fragments: chunks rank and 2*cp-1-rank of every sequence.
    """
    rows, cu, ks, kl = [], [0], [], []
    start = 0
    for n in lens:
        if n % (2 * cp):
            raise ValueError(f"sequence length {n} is not divisible by 2*cp = {2 * cp}")
        c = n // (2 * cp)
        for chunk in (rank, 2 * cp - 1 - rank):
            rows.append(torch.arange(start + chunk * c, start + (chunk + 1) * c))
            cu.append(cu[-1] + c)
            ks.append(start)
            kl.append((chunk + 1) * c)
        start += n
    i32 = dict(dtype=torch.int32)
    return torch.cat(rows), torch.tensor(cu, **i32), torch.tensor(ks, **i32), torch.tensor(kl, **i32)


def assert_same_selection(idx_a: torch.Tensor, idx_b: torch.Tensor, scores: Optional[torch.Tensor] = None,
                          *, atol: float = 1e-2, rtol: float = 1e-3, max_mismatch_frac: float = 0.0) -> None:
    """Compare two selections [Hkv, T, k] as sets per (group, token).

    Both must put the same block in the last valid slot (the local one), have the same valid count
    and keep -1 only after the valid slots. Rows whose sets differ are accepted when ``scores``
    (block scores [Hkv, T, nb], e.g. brute_block_scores or msa_kernels' block_scores_ref) shows the
    swapped blocks are near-ties: all blocks in the symmetric difference score within atol + rtol *
    |score| of each other. At most ``max_mismatch_frac`` of rows may differ beyond that (0 = none).
    """
    if idx_a.shape != idx_b.shape:
        raise AssertionError(f"selection shapes differ: {tuple(idx_a.shape)} vs {tuple(idx_b.shape)}")
    a, b = idx_a.detach().cpu().long(), idx_b.detach().cpu().long()
    if scores is not None:
        scores = scores.detach().cpu().double()  # one copy, not a device sync per looked-up score
    for name, x in (("idx_a", a), ("idx_b", b)):
        valid = x >= 0
        if (valid[..., 1:] & ~valid[..., :-1]).any():
            raise AssertionError(f"{name} has a valid id after a -1 slot")
    na, nb_ = (a >= 0).sum(-1), (b >= 0).sum(-1)
    if not torch.equal(na, nb_):
        r, i = (na != nb_).nonzero()[0].tolist()
        raise AssertionError(f"valid counts differ at (group {r}, token {i}): {a[r, i].tolist()} vs {b[r, i].tolist()}")
    last = (na - 1).clamp(min=0).unsqueeze(-1)
    la, lb = a.gather(-1, last).squeeze(-1), b.gather(-1, last).squeeze(-1)
    if not torch.equal(la, lb):
        r, i = (la != lb).nonzero()[0].tolist()
        raise AssertionError(f"last valid (local) slot differs at (group {r}, token {i}): "
                             f"{a[r, i].tolist()} vs {b[r, i].tolist()}")
    sa, sb = a.sort(-1).values, b.sort(-1).values
    rows = (sa != sb).any(-1).nonzero().tolist()
    bad = []
    for r, i in rows:
        set_a, set_b = set(a[r, i].tolist()) - {-1}, set(b[r, i].tolist()) - {-1}
        diff = sorted(set_a ^ set_b)
        if scores is not None:
            vals = [float(scores[r, i, blk]) for blk in diff]
            spread = max(vals) - min(vals)
            if all(math.isfinite(v) for v in vals) and spread <= atol + rtol * max(abs(v) for v in vals):
                continue
        bad.append((r, i, sorted(set_a), sorted(set_b)))
    total = a.shape[0] * a.shape[1]
    if len(bad) > max_mismatch_frac * total:
        r, i, xa, xb = bad[0]
        raise AssertionError(f"{len(bad)} of {total} (group, token) selections differ beyond near-ties; "
                             f"first at (group {r}, token {i}): {xa} vs {xb}")


_EMPTY_FNS = ("empty", "empty_like", "empty_strided")


@contextlib.contextmanager
def poison_allocations():
    """Make torch.empty / empty_like / empty_strided return NaN-filled floats (ints: the dtype minimum).

    Kernels that leave part of an output unwritten then produce NaNs / garbage the tests catch.
    """
    originals = {name: getattr(torch, name) for name in _EMPTY_FNS}

    def wrap(fn):
        def poisoned(*args, **kwargs):
            t = fn(*args, **kwargs)
            if t.is_floating_point() or t.is_complex():
                t.fill_(float("nan"))
            elif t.dtype != torch.bool:
                info = torch.iinfo(t.dtype)
                t.fill_(info.min if info.min < 0 else info.max)
            return t
        return poisoned

    try:
        for name, fn in originals.items():
            setattr(torch, name, wrap(fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, *, atol: float = 1e-5,
                 rtol: float = 1e-5) -> None:
    """torch.testing.assert_close on CPU float64 copies, with NaN never accepted, naming the quantity."""
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    if torch.isnan(a).any():
        raise AssertionError(f"{name}: result contains NaN")
    torch.testing.assert_close(a, e, atol=atol, rtol=rtol, equal_nan=False, msg=lambda m: f"{name}: {m}")
