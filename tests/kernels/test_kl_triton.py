"""Triton indexer_kl / indexer_kl_dense (forward value and both gradients) against the references.

CPU: kernels under TRITON_INTERPRET=1 at tiny sizes; fp32 inputs agree with the chunked reference and
the float64 brute-force formula to ~1e-5. Both modes are covered: the default KV-outer atomic path and
the deterministic union-tile path. Supports come from random_topk (scattered -1 slots, empty rows, the
local block sometimes missing) and from select_blocks. GPU (@pytest.mark.gpu): 8K tokens, 64/4 and
64/8 heads, d = Di = 128, block 128, top-16, bf16 vs a float32 reference.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import msa_kernels  # noqa: E402
from msa_kernels.attention.naive import sparse_attention_ref  # noqa: E402
from msa_kernels.kl import naive  # noqa: E402
from msa_kernels.kl import triton as kl_triton  # noqa: E402
from msa_kernels.layout import make_layout  # noqa: E402
from msa_kernels.select import triton as sel_triton  # noqa: E402
from msa_kernels.tuning import kl_tuning  # noqa: E402

from .reference_utils import (brute_kl, brute_kl_dense, cu_seqlens_of, poison_allocations,  # noqa: E402
                              random_topk, selection_mask, zigzag_rank)

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))


def _case(lens, hq, hkv, d, di, bs, topk, dtype=torch.float32, device=DEV, key_layout=None, logit_scale=1.0,
          p_empty=0.1):
    gen = _gen()
    t = sum(lens)
    cu = cu_seqlens_of(lens)
    ks, kl = key_layout if key_layout is not None else (None, None)
    tk = t if ks is None else int(max(int(a) + int(b) for a, b in zip(ks, kl)))
    q = (torch.randn(t, hq, d, generator=gen) * logit_scale).to(dtype)
    k = torch.randn(tk, hkv, d, generator=gen).to(dtype)
    v = torch.randn(tk, hkv, d, generator=gen).to(dtype)
    q_idx = (torch.randn(t, hkv, di, generator=gen) * 0.7).to(dtype)
    k_idx = (torch.randn(tk, di, generator=gen) * 0.7).to(dtype)
    topk_idx = random_topk(cu, hkv, bs, topk, generator=gen, key_starts=ks, key_lens=kl, p_empty=p_empty)
    lay = make_layout(cu.to(device), None if ks is None else ks.to(device), None if kl is None else kl.to(device),
                      total_keys=tk, total_queries=t)
    _, lse = sparse_attention_ref(q.float().to(device), k.float().to(device), v.float().to(device),
                                  topk_idx.to(device), lay, block_size=bs, scale=d ** -0.5)
    mv = lambda x: x.to(device)  # noqa: E731
    return dict(cu=cu, ks=ks, kl=kl, lay=lay, q=mv(q), k=mv(k), lse=lse.detach(), q_idx=mv(q_idx),
                k_idx=mv(k_idx), topk_idx=mv(topk_idx), bs=bs)


def _grads(fn, q_idx, k_idx):
    qi = q_idx.detach().clone().requires_grad_(True)
    ki = k_idx.detach().clone().requires_grad_(True)
    out = fn(qi, ki)
    dq, dk = torch.autograd.grad(out, [qi, ki])
    return out.detach(), dq, dk


def _close(a, b, tol, name):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    err = float((a - b).norm() / b.norm().clamp_min(1e-30))
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol}"


def _sparse(c, deterministic, reduction="mean", impl="triton", tuning=None):
    def run(qi, ki):
        kw = dict(block_size=c["bs"], scale=c["q"].shape[-1] ** -0.5, index_scale=qi.shape[-1] ** -0.5,
                  reduction=reduction)
        if impl == "triton":
            with poison_allocations():
                return kl_triton.indexer_kl_triton(c["q"], c["k"], c["lse"], qi, ki, c["topk_idx"], c["lay"],
                                                   deterministic=deterministic, tuning=tuning, **kw)
        return naive.indexer_kl_ref(c["q"].float(), c["k"].float(), c["lse"], qi.float(), ki.float(),
                                    c["topk_idx"], c["lay"], **kw)
    return run


SPARSE_CASES = [
    # lens, hq, hkv, d, di, block, topk
    ([37, 70, 5], 4, 2, 16, 16, 16, 3),  # packed, odd lengths, a sequence shorter than one block
    ([90], 2, 1, 32, 16, 16, 2),
    ([20, 50], 4, 4, 16, 32, 32, 2),  # G = 1
    ([61, 3], 8, 2, 16, 16, 16, 8),  # topk wider than the visible blocks
    ([50, 9], 6, 2, 24, 20, 16, 3),  # G = 3 (padded), head dims that are not powers of two
]


def _path(name):
    """(deterministic, tuning) routing the sparse KL through one of its three paths: all-KV-outer atomics
    ("atomic"), union-tile forward + atomic dk ("union"), or the deterministic union path."""
    base = kl_tuning(not CUDA)
    waste = 1e9 if name == "union" else 0.0
    return name == "deterministic", dataclasses.replace(base, union_max_waste=waste)


KL_PATHS = ["atomic", "union", "deterministic"]


@pytest.mark.parametrize("kl_path", KL_PATHS)
@pytest.mark.parametrize("lens,hq,hkv,d,di,bs,topk", SPARSE_CASES)
def test_indexer_kl_matches_reference(lens, hq, hkv, d, di, bs, topk, kl_path):
    deterministic, tuning = _path(kl_path)
    c = _case(lens, hq, hkv, d, di, bs, topk)
    got = _grads(_sparse(c, deterministic, tuning=tuning), c["q_idx"], c["k_idx"])
    ref = _grads(_sparse(c, deterministic, impl="reference"), c["q_idx"], c["k_idx"])
    for name, a, b in zip(("kl", "dq_idx", "dk_idx"), got, ref):
        _close(a, b, 1e-5, name)
    assert got[0].dtype == torch.float32 and got[0].dim() == 0


def test_indexer_kl_matches_brute_force_sum():
    c = _case([45, 30], 4, 2, 16, 16, 16, 3)
    mask = selection_mask(c["topk_idx"].cpu(), c["cu"], c["k"].shape[0], c["bs"])
    got = _grads(_sparse(c, False, reduction="sum"), c["q_idx"], c["k_idx"])
    brute = _grads(lambda qi, ki: brute_kl(c["q"].cpu(), c["k"].cpu(), c["lse"].cpu(), qi.cpu(), ki.cpu(), mask,
                                           reduction="sum"), c["q_idx"].double(), c["k_idx"].double())
    for name, a, b in zip(("kl", "dq_idx", "dk_idx"), got, brute):
        _close(a, b, 1e-5, name)


def test_indexer_kl_on_selected_blocks_with_large_logits():
    # Support from select_blocks itself; teacher logits well above 30.
    c = _case([80, 47], 4, 2, 16, 16, 16, 4, logit_scale=8.0)
    lay = c["lay"]
    c["topk_idx"] = sel_triton.select_blocks_triton(c["q_idx"], c["k_idx"], lay, block_size=16, topk=4,
                                                    index_scale=0.25)
    from msa_kernels.attention.naive import sparse_attention_ref as attn
    _, lse = attn(c["q"].float(), c["k"].float(), c["k"].float(), c["topk_idx"], lay, block_size=16,
                  scale=16 ** -0.5)
    c["lse"] = lse.detach()
    got = _grads(_sparse(c, False), c["q_idx"], c["k_idx"])
    ref = _grads(_sparse(c, False, impl="reference"), c["q_idx"], c["k_idx"])
    for name, a, b in zip(("kl", "dq_idx", "dk_idx"), got, ref):
        _close(a, b, 1e-5, name)


@pytest.mark.parametrize("kl_path", KL_PATHS)
def test_indexer_kl_fp16_inputs(kl_path):
    deterministic, tuning = _path(kl_path)
    c = _case([60, 21], 4, 2, 32, 32, 16, 3, dtype=torch.float16)
    got = _grads(_sparse(c, deterministic, reduction="sum", tuning=tuning), c["q_idx"], c["k_idx"])
    ref = _grads(_sparse(c, deterministic, reduction="sum", impl="reference"), c["q_idx"].float(),
                 c["k_idx"].float())
    for name, a, b in zip(("kl", "dq_idx", "dk_idx"), got, ref):
        _close(a, b, 1e-2, name)


def test_indexer_kl_context_parallel_zigzag():
    """Two zigzag ranks' sum-KLs and gradients add up to the full-sequence result."""
    lens, cp, bs = [64, 32], 2, 16
    full = _case(lens, 4, 2, 16, 16, bs, 3, p_empty=0.0)
    ref = _grads(_sparse(full, False, reduction="sum", impl="reference"), full["q_idx"], full["k_idx"])
    for det in (False, True):
        total_kl, dq_full, dk_full = 0.0, torch.zeros_like(ref[1]), torch.zeros_like(ref[2])
        for rank in range(cp):
            rows, cu, ks, kl = zigzag_rank(lens, cp, rank)
            rows_d = rows.to(DEV)
            lay = make_layout(cu.to(DEV), ks.to(DEV), kl.to(DEV), total_keys=full["k"].shape[0],
                              total_queries=rows.numel())
            part = dict(full, lay=lay, q=full["q"][rows_d], lse=full["lse"][rows_d],
                        topk_idx=full["topk_idx"][:, rows_d].contiguous())
            out = _grads(lambda qi, ki, part=part, det=det, rows_d=rows_d:
                         _sparse(part, det, reduction="sum")(qi[rows_d], ki),
                         full["q_idx"], full["k_idx"])
            total_kl += float(out[0])
            dq_full += out[1]
            dk_full += out[2]
        _close(torch.tensor(total_kl), ref[0], 1e-5, f"kl (deterministic={det})")
        _close(dq_full, ref[1], 1e-5, f"dq_idx (deterministic={det})")
        _close(dk_full, ref[2], 1e-5, f"dk_idx (deterministic={det})")


def test_indexer_kl_gradients_reach_only_the_index_branch():
    c = _case([40], 4, 2, 16, 16, 16, 2)
    q = c["q"].clone().requires_grad_(True)
    k = c["k"].clone().requires_grad_(True)
    qi = c["q_idx"].clone().requires_grad_(True)
    out = kl_triton.indexer_kl_triton(q, k, c["lse"], qi, c["k_idx"], c["topk_idx"], c["lay"], block_size=16,
                                      scale=0.25, index_scale=0.25)
    out.backward()
    assert q.grad is None and k.grad is None
    assert qi.grad is not None and torch.isfinite(qi.grad).all()


def test_indexer_kl_public_api_dispatch(monkeypatch):
    c = _case([33, 40], 4, 2, 16, 16, 16, 3)
    args = (c["q"], c["k"], c["lse"], c["q_idx"], c["k_idx"], c["topk_idx"], c["cu"].to(DEV))
    monkeypatch.setenv("MSA_KERNELS_BACKEND", "triton")
    got = msa_kernels.indexer_kl(*args, block_size=16)
    monkeypatch.setenv("MSA_KERNELS_BACKEND", "reference")
    ref = msa_kernels.indexer_kl(*args, block_size=16)
    _close(got, ref, 1e-5, "kl")


# ------------------------------------------------------------------------------------------------
# Dense warmup KL
# ------------------------------------------------------------------------------------------------
def _dense(c, deterministic, lse=None, reduction="mean", impl="triton"):
    def run(qi, ki):
        kw = dict(scale=c["q"].shape[-1] ** -0.5, index_scale=qi.shape[-1] ** -0.5, lse=lse, reduction=reduction)
        if impl == "triton":
            with poison_allocations():
                return kl_triton.indexer_kl_dense_triton(c["q"], c["k"], qi, ki, c["lay"],
                                                         deterministic=deterministic, **kw)
        return naive.indexer_kl_dense_ref(c["q"].float(), c["k"].float(), qi.float(), ki.float(), c["lay"], **kw)
    return run


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("lens,hq,hkv,d,di", [([37, 70, 5], 4, 2, 16, 16), ([50], 2, 2, 32, 16)])
def test_indexer_kl_dense_matches_reference(lens, hq, hkv, d, di, deterministic):
    c = _case(lens, hq, hkv, d, di, 16, 1)
    got = _grads(_dense(c, deterministic), c["q_idx"], c["k_idx"])
    ref = _grads(_dense(c, deterministic, impl="reference"), c["q_idx"], c["k_idx"])
    for name, a, b in zip(("kl", "dq_idx", "dk_idx"), got, ref):
        _close(a, b, 1e-5, name)


def test_indexer_kl_dense_given_lse_and_brute_force():
    c = _case([41, 30], 4, 2, 16, 16, 16, 1)
    brute = _grads(lambda qi, ki: brute_kl_dense(c["q"].cpu(), c["k"].cpu(), qi.cpu(), ki.cpu(), c["cu"],
                                                 reduction="sum"), c["q_idx"].double(), c["k_idx"].double())
    got = _grads(_dense(c, False, reduction="sum"), c["q_idx"], c["k_idx"])
    for name, a, b in zip(("kl", "dq_idx", "dk_idx"), got, brute):
        _close(a, b, 1e-5, name)
    # With an explicit (here: unrelated, finite) lse the teacher must use it, as the reference does.
    lse = torch.randn(c["q"].shape[0], c["q"].shape[1], device=DEV) + 4.0
    got = _grads(_dense(c, True, lse=lse), c["q_idx"], c["k_idx"])
    ref = _grads(_dense(c, True, lse=lse, impl="reference"), c["q_idx"], c["k_idx"])
    for name, a, b in zip(("kl", "dq_idx", "dk_idx"), got, ref):
        _close(a, b, 1e-5, name)


def test_indexer_kl_dense_context_parallel_zigzag():
    lens, cp = [64, 32], 2
    full = _case(lens, 4, 2, 16, 16, 16, 1)
    ref = _grads(_dense(full, False, reduction="sum"), full["q_idx"], full["k_idx"])
    total, dq, dk = 0.0, torch.zeros_like(ref[1]), torch.zeros_like(ref[2])
    for rank in range(cp):
        rows, cu, ks, kl = zigzag_rank(lens, cp, rank)
        rows_d = rows.to(DEV)
        lay = make_layout(cu.to(DEV), ks.to(DEV), kl.to(DEV), total_keys=full["k"].shape[0],
                          total_queries=rows.numel())
        part = dict(full, lay=lay, q=full["q"][rows_d])
        out = _grads(lambda qi, ki, part=part, rows_d=rows_d:
                     _dense(part, True, reduction="sum")(qi[rows_d], ki),
                     full["q_idx"], full["k_idx"])
        total += float(out[0])
        dq += out[1]
        dk += out[2]
    _close(torch.tensor(total), ref[0], 1e-5, "kl")
    _close(dq, ref[1], 1e-5, "dq_idx")
    _close(dk, ref[2], 1e-5, "dk_idx")


# ------------------------------------------------------------------------------------------------
# GPU: real sizes, bf16 inputs vs the float32 reference
# ------------------------------------------------------------------------------------------------
def _gpu_case(t, hq, hkv, monkeypatch):
    import msa_kernels.layout as layout_mod
    monkeypatch.setattr(layout_mod, "REFERENCE_CHUNK_ELEMENTS", 1 << 27)
    gen = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31, ())))
    lens = [t - 300, 300]
    cu = cu_seqlens_of(lens, "cuda")
    lay = make_layout(cu, total_keys=t, total_queries=t)
    bf = torch.bfloat16
    q = torch.randn(t, hq, 128, device="cuda", generator=gen).to(bf)
    k = torch.randn(t, hkv, 128, device="cuda", generator=gen).to(bf)
    q_idx = (torch.randn(t, hkv, 128, device="cuda", generator=gen) * 0.5).to(bf)
    k_idx = (torch.randn(t, 128, device="cuda", generator=gen) * 0.5).to(bf)
    topk_idx = sel_triton.select_blocks_triton(q_idx, k_idx, lay, block_size=128, topk=16, index_scale=128 ** -0.5)
    _, lse = sparse_attention_ref(q.float(), k.float(), k.float(), topk_idx, lay, block_size=128,
                                  scale=128 ** -0.5)
    return dict(cu=cu, lay=lay, q=q, k=k, lse=lse.detach(), q_idx=q_idx, k_idx=k_idx, topk_idx=topk_idx, bs=128)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("hq,hkv", [(64, 4), (64, 8)])
def test_indexer_kl_gpu_parity(hq, hkv, deterministic, monkeypatch):
    c = _gpu_case(8192, hq, hkv, monkeypatch)
    got = _grads(_sparse(c, deterministic), c["q_idx"], c["k_idx"])
    ref = _grads(_sparse(c, deterministic, impl="reference"), c["q_idx"].float(), c["k_idx"].float())
    _close(got[0], ref[0], 1e-4, "kl")
    _close(got[1], ref[1], 2e-2, "dq_idx")
    _close(got[2], ref[2], 2e-2, "dk_idx")


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv", [(64, 4), (64, 8)])
def test_indexer_kl_dense_gpu_parity(hq, hkv, monkeypatch):
    c = _gpu_case(8192, hq, hkv, monkeypatch)
    got = _grads(_dense(c, False), c["q_idx"], c["k_idx"])
    ref = _grads(_dense(c, False, impl="reference"), c["q_idx"].float(), c["k_idx"].float())
    _close(got[0], ref[0], 1e-4, "kl")
    _close(got[1], ref[1], 2e-2, "dq_idx")
    _close(got[2], ref[2], 2e-2, "dk_idx")
