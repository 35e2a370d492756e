"""Parity of every op against the exact reference, in the bench's own run (bf16 kernels vs fp32
reference at a packed 8K case, selection from select_blocks on 'smooth' index vectors so the fused
attention+KL node, not its unfused fallback, is what gets checked). A failed op's timings are still
reported, marked by the parity line of bench.json / bench.md."""
from __future__ import annotations

from typing import Dict

import torch

from .selections import Family, index_vectors

__all__ = ["check_parity"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    fin = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), fin) or torch.isnan(a).any():
        return float("inf")
    return float((a[fin] - b[fin]).norm() / b[fin].norm().clamp_min(1e-12))


def check_parity(shape, device, lens=(3000, 5192)) -> Dict[str, str]:
    import msa_kernels as mk
    from msa_kernels.attention.naive import sparse_attention_ref
    from msa_kernels.kl.naive import indexer_kl_ref
    from msa_kernels.select.naive import select_blocks_ref

    hq, hkv, d, di, bs, k = shape.hq, shape.hkv, shape.dim, shape.index_dim, shape.block_size, shape.topk
    t = sum(lens)
    cu = torch.tensor([0, lens[0], t], dtype=torch.int32, device=device)
    lay = mk.make_layout(cu, total_keys=t)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(1234)
    qi, ki = index_vectors(Family("smooth", 256, 0.5), t, hkv, di, device, seed=7, dtype=dtype)
    q, kk, v = (torch.randn((t, h, d), generator=g, device=device, dtype=dtype) for h in (hq, hkv, hkv))
    status: Dict[str, str] = {}

    sel = mk.select_blocks(qi, ki, cu, bs, k)
    ref_sel = select_blocks_ref(qi.float(), ki.float(), lay, block_size=bs, topk=k, index_scale=di ** -0.5)
    same = (torch.sort(sel, -1).values == torch.sort(ref_sel, -1).values).all(-1).float().mean().item()
    local_ok = bool(((sel >= 0).sum(-1) == (ref_sel >= 0).sum(-1)).all())
    # bf16 index scores round differently from the fp32 reference: a few near-tie rows may swap a block.
    status["select_blocks"] = "ok" if same >= 0.99 and local_ok else f"FAIL ({same:.4f} rows identical)"
    status["select_blocks_detail"] = f"{same:.5f} of (group, token) rows select the same set"

    xs = [x.detach().clone().requires_grad_() for x in (q, kk, v, qi, ki)]
    go = torch.randn((t, hq, d), generator=g, device=device, dtype=dtype)
    out, lse, kl = mk.sparse_attention_and_kl(*xs[:3], sel, xs[3], xs[4], cu, bs)
    node = type(out.grad_fn).__name__
    torch.autograd.backward([out, kl], [go, torch.ones_like(kl)])
    rs = [x.detach().float().requires_grad_() for x in (q, kk, v, qi, ki)]
    rout, rlse = sparse_attention_ref(*rs[:3], sel, lay, block_size=bs, scale=d ** -0.5)
    rkl = indexer_kl_ref(rs[0].detach(), rs[1].detach(), rlse.detach(), rs[3], rs[4], sel, lay, block_size=bs,
                         scale=d ** -0.5, index_scale=di ** -0.5)
    torch.autograd.backward([rout, rkl], [go.float(), torch.ones_like(rkl)])
    errs = {"out": _rel(out, rout), "lse": _rel(lse, rlse),
            "kl": abs(kl.item() - rkl.item()) / max(abs(rkl.item()), 1e-6),
            **{n: _rel(a.grad, b.grad) for n, a, b in zip(("dq", "dk", "dv", "dq_idx", "dk_idx"), xs, rs)}}
    status["layer"] = "ok" if max(errs.values()) < 2e-2 else f"FAIL {errs}"
    status["layer_detail"] = f"{node}: " + " ".join(f"{n}={e:.1e}" for n, e in errs.items())
    return status
