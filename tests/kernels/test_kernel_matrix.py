"""Every Triton kernel path against the exact reference, across group sizes and half precisions.

CPU: the real kernels under TRITON_INTERPRET=1 (tests/kernels/conftest.py) at tiny sizes: packed
odd lengths with a sequence shorter than one block, G in {1, 2, 4, 8, 16}, fp16 and bf16 inputs, all
outputs and every gradient, compared with the float32 reference run on the same (rounded) inputs.
Paths: select_blocks; the whole layer as the model runs it (select_blocks + the fused
attention/KL node, forced onto the fused path); attention alone with each dQ mode; the sparse KL's
three algorithms (all-KV-outer atomics, union tile, deterministic union); the dense warmup KL.
GPU (-m gpu): the layer at the benchmark shapes (64/4 and 64/8 heads, d = Di = 128, block 128,
top-16, 8K packed and 32K), bf16 against the float32 reference.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

triton = pytest.importorskip("triton")

import msa_kernels as mk  # noqa: E402
from msa_kernels.attention import triton_fwd  # noqa: E402
from msa_kernels.attention.naive import sparse_attention_ref  # noqa: E402
from msa_kernels.kl import fused  # noqa: E402
from msa_kernels.kl import triton as kl_triton  # noqa: E402
from msa_kernels.kl.naive import indexer_kl_dense_ref, indexer_kl_ref  # noqa: E402
from msa_kernels.layout import make_layout  # noqa: E402
from msa_kernels.select import triton as sel_triton  # noqa: E402
from msa_kernels.select.naive import block_scores_ref, select_blocks_ref  # noqa: E402
from msa_kernels.tuning import bwd_config, kl_tuning  # noqa: E402

from .reference_utils import assert_same_selection, cu_seqlens_of, poison_allocations  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
LENS = [37, 5, 22]  # packed, odd, one sequence shorter than a block
D, DI, BS, TOPK = 16, 16, 16, 3
GROUPS = [1, 2, 4, 8, 16]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Relative L2 error of half-precision kernels vs the fp32 reference on the same rounded inputs.
TOL = {"fp16": 5e-3, "bf16": 3e-2}


def _heads(g):
    hkv = 2 if g <= 4 else 1
    return g * hkv, hkv


def _inputs(g, dtype, seed, lens=LENS, d=D, di=DI, device=DEV):
    hq, hkv = _heads(g)
    gen = torch.Generator().manual_seed(seed)
    t = sum(lens)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(dtype).to(device)

    return dict(q=rnd(t, hq, d), k=rnd(t, hkv, d), v=rnd(t, hkv, d), q_idx=rnd(t, hkv, di, s=0.7),
                k_idx=rnd(t, di, s=0.7)), torch.randn(t, hq, d, generator=gen).to(dtype).to(device)


def _rel(a, b, name, tol):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert not torch.isnan(a).any(), f"{name}: NaN"
    fin = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), fin), f"{name}: -inf pattern differs from the reference"
    err = float((a[fin] - b[fin]).norm() / b[fin].norm().clamp_min(1e-12))
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def _layout(lens=LENS, device=DEV):
    cu = cu_seqlens_of(lens).to(device)
    return cu, make_layout(cu, total_keys=sum(lens))


def _select(x, cu, lay):
    return sel_triton.select_blocks_triton(x["q_idx"], x["k_idx"], lay, block_size=BS, topk=TOPK,
                                           index_scale=DI ** -0.5)


def _reference_layer(x, sel, lay, go):
    """fp32 reference (out, lse, kl) and the five gradients of <out, go> + kl."""
    xs = {n: t.detach().float().requires_grad_(True) for n, t in x.items()}
    out, lse = sparse_attention_ref(xs["q"], xs["k"], xs["v"], sel, lay, block_size=BS, scale=D ** -0.5)
    kl = indexer_kl_ref(xs["q"].detach(), xs["k"].detach(), lse.detach(), xs["q_idx"], xs["k_idx"], sel, lay,
                        block_size=BS, scale=D ** -0.5, index_scale=DI ** -0.5)
    grads = torch.autograd.grad((out * go.float()).sum() + kl, list(xs.values()))
    return (out, lse, kl), dict(zip(xs, grads))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("g", GROUPS, ids=[f"G{g}" for g in GROUPS])
def test_select_matches_reference(g, dtype):
    x, _ = _inputs(g, DTYPES[dtype], seed=10 * g)
    cu, lay = _layout()
    got = _select(x, cu, lay)
    qi, ki = x["q_idx"].float(), x["k_idx"].float()
    ref = select_blocks_ref(qi, ki, lay, block_size=BS, topk=TOPK, index_scale=DI ** -0.5)
    scores = block_scores_ref(qi, ki, lay, block_size=BS, index_scale=DI ** -0.5)
    # Half-precision inputs, fp32 products on both sides: only exact-rounding near-ties may swap.
    assert_same_selection(got, ref, scores, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", list(DTYPES))
# G16 takes ~10 s per case under the CPU interpreter: CI's slow step (and GPUs) run it.
@pytest.mark.parametrize("g", [pytest.param(g, id=f"G{g}", marks=[pytest.mark.slow] if g == 16 else [])
                               for g in GROUPS])
def test_layer_matches_reference(g, dtype, deterministic):
    """select_blocks -> fused attention + KL node, forward values and all five gradients."""
    x, go = _inputs(g, DTYPES[dtype], seed=100 + g)
    cu, lay = _layout()
    sel = _select(x, cu, lay)
    xs = {n: t.detach().clone().requires_grad_(True) for n, t in x.items()}
    with poison_allocations():
        out, lse, kl = fused.sparse_attention_kl_triton(
            xs["q"], xs["k"], xs["v"], sel, xs["q_idx"], xs["k_idx"], lay, block_size=BS, scale=D ** -0.5,
            index_scale=DI ** -0.5, deterministic=deterministic, max_union_waste=math.inf, check_ids=False)
        assert type(out.grad_fn).__name__ == "_SparseAttentionKLTritonBackward"
        grads = dict(zip(xs, torch.autograd.grad((out.float() * go.float()).sum() + kl, list(xs.values()))))
    (rout, rlse, rkl), rgrads = _reference_layer(x, sel, lay, go)
    tol = TOL[dtype]
    _rel(out, rout, "out", tol)
    _rel(lse, rlse, "lse", tol)
    _rel(kl, rkl, "kl", tol)
    for name in rgrads:
        _rel(grads[name], rgrads[name], f"d{name}", 2 * tol)
        assert grads[name].dtype == x[name].dtype


@pytest.mark.parametrize("mode", ["atomic", "qouter"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("g", [1, 16], ids=["G1", "G16"])
def test_attention_dq_modes(g, dtype, mode):
    x, go = _inputs(g, DTYPES[dtype], seed=200 + g)
    cu, lay = _layout()
    sel = _select(x, cu, lay)
    cfg = dataclasses.replace(bwd_config(D, g, BS, interpret=not CUDA), dq_mode=mode)
    xs = [x[n].detach().clone().requires_grad_(True) for n in ("q", "k", "v")]
    with poison_allocations():
        out, lse = triton_fwd.sparse_attention_triton(*xs, sel, lay, block_size=BS, scale=D ** -0.5, bwd_cfg=cfg)
        grads = torch.autograd.grad((out.float() * go.float()).sum(), xs)
    rs = [x[n].detach().float().requires_grad_(True) for n in ("q", "k", "v")]
    rout, rlse = sparse_attention_ref(*rs, sel, lay, block_size=BS, scale=D ** -0.5)
    rgrads = torch.autograd.grad((rout * go.float()).sum(), rs)
    _rel(out, rout, "out", TOL[dtype])
    for name, a, b in zip(("dq", "dk", "dv"), grads, rgrads):
        _rel(a, b, name, 2 * TOL[dtype])


KL_PATHS = ["kv_outer", "union", "deterministic"]


@pytest.mark.parametrize("path", KL_PATHS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("g", [1, 16], ids=["G1", "G16"])
def test_sparse_kl_paths(g, dtype, path):
    x, _ = _inputs(g, DTYPES[dtype], seed=300 + g)
    cu, lay = _layout()
    sel = _select(x, cu, lay)
    _, lse = sparse_attention_ref(x["q"].float(), x["k"].float(), x["v"].float(), sel, lay, block_size=BS,
                                  scale=D ** -0.5)
    tuning = dataclasses.replace(kl_tuning(not CUDA), union_max_waste=1e9 if path == "union" else 0.0)
    kw = dict(block_size=BS, scale=D ** -0.5, index_scale=DI ** -0.5)
    qi, ki = (x[n].detach().clone().requires_grad_(True) for n in ("q_idx", "k_idx"))
    with poison_allocations():
        kl = kl_triton.indexer_kl_triton(x["q"], x["k"], lse, qi, ki, sel, lay, deterministic=path == "deterministic",
                                         tuning=tuning, **kw)
        got = (kl, *torch.autograd.grad(kl, [qi, ki]))
    rq, rk = (x[n].detach().float().requires_grad_(True) for n in ("q_idx", "k_idx"))
    rkl = indexer_kl_ref(x["q"].float(), x["k"].float(), lse, rq, rk, sel, lay, **kw)
    ref = (rkl, *torch.autograd.grad(rkl, [rq, rk]))
    for name, a, b in zip(("kl", "dq_idx", "dk_idx"), got, ref):
        _rel(a, b, name, 2 * TOL[dtype])


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("g", [1, 16], ids=["G1", "G16"])
def test_dense_kl(g, dtype, deterministic):
    x, _ = _inputs(g, DTYPES[dtype], seed=400 + g)
    cu, lay = _layout()
    kw = dict(scale=D ** -0.5, index_scale=DI ** -0.5)
    qi, ki = (x[n].detach().clone().requires_grad_(True) for n in ("q_idx", "k_idx"))
    with poison_allocations():
        kl = kl_triton.indexer_kl_dense_triton(x["q"], x["k"], qi, ki, lay, deterministic=deterministic, **kw)
        got = (kl, *torch.autograd.grad(kl, [qi, ki]))
    rq, rk = (x[n].detach().float().requires_grad_(True) for n in ("q_idx", "k_idx"))
    rkl = indexer_kl_dense_ref(x["q"].float(), x["k"].float(), rq, rk, lay, **kw)
    ref = (rkl, *torch.autograd.grad(rkl, [rq, rk]))
    for name, a, b in zip(("kl", "dq_idx", "dk_idx"), got, ref):
        _rel(a, b, name, 2 * TOL[dtype])


# ----------------------------------------------------------------------------- GPU, benchmark shapes

@pytest.mark.gpu
@pytest.mark.parametrize("lens", [[3000, 5192], [32768]], ids=["8K-packed", "32K"])
@pytest.mark.parametrize("hq,hkv", [(64, 4), (64, 8)], ids=["64-4", "64-8"])
def test_gpu_layer_at_benchmark_shapes(hq, hkv, lens):
    """The public layer (select_blocks + sparse_attention_and_kl, fwd+bwd) in bf16 vs fp32 reference."""
    gen = torch.Generator(device="cuda").manual_seed(hq + hkv + sum(lens))
    t, d = sum(lens), 128
    cu = cu_seqlens_of(lens).cuda()
    lay = make_layout(cu, total_keys=t)
    x = {n: torch.randn(s, generator=gen, device="cuda", dtype=torch.bfloat16)
         for n, s in dict(q=(t, hq, d), k=(t, hkv, d), v=(t, hkv, d), q_idx=(t, hkv, d), k_idx=(t, d)).items()}
    go = torch.randn((t, hq, d), generator=gen, device="cuda", dtype=torch.bfloat16)
    sel = mk.select_blocks(x["q_idx"], x["k_idx"], cu, 128, 16)
    xs = {n: v.detach().clone().requires_grad_(True) for n, v in x.items()}
    out, lse, kl = mk.sparse_attention_and_kl(xs["q"], xs["k"], xs["v"], sel, xs["q_idx"], xs["k_idx"], cu, 128)
    grads = dict(zip(xs, torch.autograd.grad((out.float() * go.float()).sum() + kl, list(xs.values()))))
    rx = {n: v.detach().float().requires_grad_(True) for n, v in x.items()}
    rout, rlse = sparse_attention_ref(rx["q"], rx["k"], rx["v"], sel, lay, block_size=128, scale=d ** -0.5)
    rkl = indexer_kl_ref(rx["q"].detach(), rx["k"].detach(), rlse.detach(), rx["q_idx"], rx["k_idx"], sel, lay,
                         block_size=128, scale=d ** -0.5, index_scale=d ** -0.5)
    rgrads = dict(zip(rx, torch.autograd.grad((rout * go.float()).sum() + rkl, list(rx.values()))))
    _rel(out, rout, "out", 2e-2)
    _rel(lse, rlse, "lse", 1e-3)
    _rel(kl, rkl, "kl", 2e-2)
    for name in rgrads:
        _rel(grads[name], rgrads[name], f"d{name}", 3e-2)
