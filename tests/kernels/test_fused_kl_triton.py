"""sparse_attention_and_kl: the fused Triton node (KL key gradient inside the attention backward)
against the two separate reference ops, forward values and all five gradients.

CPU: kernels under TRITON_INTERPRET=1 at tiny sizes, fp32 (~1e-5), fresh random inputs, every
allocation poisoned; packed odd lengths, a sequence shorter than one block, G = 1 / 2 / 4, top-k
wider than the visible blocks, empty rows, context-parallel zigzag key layouts, both reduction
modes, deterministic (bitwise reproducible) and atomic. GPU (@pytest.mark.gpu): 8K-16K tokens at
64/8 and 16/4 heads, bf16 vs a float32 reference.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import msa_kernels  # noqa: E402
from msa_kernels.attention import triton_common, triton_fwd  # noqa: E402
from msa_kernels.attention.naive import sparse_attention_ref  # noqa: E402
from msa_kernels.kl import fused  # noqa: E402
from msa_kernels.kl.naive import indexer_kl_ref  # noqa: E402
from msa_kernels.layout import make_layout  # noqa: E402
from msa_kernels.tuning import kl_tuning  # noqa: E402

from .reference_utils import cu_seqlens_of, poison_allocations, random_topk, zigzag_rank  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _case(lens, hq, hkv, d, di, bs, topk, *, dtype=torch.float32, key_layout=None, p_empty=0.05, seed=None):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())) if seed is None else seed)
    t = sum(lens)
    cu = cu_seqlens_of(lens)
    ks, kl = key_layout if key_layout is not None else (None, None)
    tk = t if ks is None else int(max(int(a) + int(b) for a, b in zip(ks, kl)))
    rnd = lambda *shape, s=1.0: (torch.randn(*shape, generator=gen) * s).to(dtype).to(DEV)  # noqa: E731
    topk_idx = random_topk(cu, hkv, bs, topk, generator=gen, key_starts=ks, key_lens=kl, p_empty=p_empty)
    lay = make_layout(cu.to(DEV), None if ks is None else ks.to(DEV), None if kl is None else kl.to(DEV),
                      total_keys=tk, total_queries=t)
    inputs = dict(q=rnd(t, hq, d), k=rnd(tk, hkv, d), v=rnd(tk, hkv, d), q_idx=rnd(t, hkv, di, s=0.7),
                  k_idx=rnd(tk, di, s=0.7))
    upstream = dict(go=torch.randn(t, hq, d, generator=gen).to(DEV), gl=torch.randn(t, hq, generator=gen).to(DEV),
                    gkl=float(torch.rand((), generator=gen)) + 0.5)
    return inputs, topk_idx.to(DEV), lay, bs, upstream


def _run(fn, inputs, up):
    """fn(q, k, v, q_idx, k_idx) -> (out, lse, kl); returns the values and the five gradients of
    <out, go> + <lse, gl> (finite rows) + gkl * kl."""
    xs = {n: x.detach().clone().requires_grad_(True) for n, x in inputs.items()}
    out, lse, kl = fn(**xs)
    gl = torch.where(torch.isfinite(lse), up["gl"], torch.zeros_like(up["gl"]))
    loss = (out.float() * up["go"]).sum() + (torch.nan_to_num(lse, neginf=0.0) * gl).sum() + up["gkl"] * kl
    grads = torch.autograd.grad(loss, list(xs.values()))
    return [out.detach(), lse.detach(), kl.detach()], dict(zip(xs, grads))


def _reference(topk_idx, lay, bs, reduction):
    def fn(q, k, v, q_idx, k_idx):
        kw = dict(block_size=bs, scale=q.shape[-1] ** -0.5)
        out, lse = sparse_attention_ref(q.float(), k.float(), v.float(), topk_idx, lay, **kw)
        kl = indexer_kl_ref(q.detach().float(), k.detach().float(), lse.detach(), q_idx.float(), k_idx.float(),
                            topk_idx, lay, index_scale=q_idx.shape[-1] ** -0.5, reduction=reduction, **kw)
        return out, lse, kl
    return fn


def _fused(topk_idx, lay, bs, reduction, deterministic, max_union_waste=math.inf):
    def fn(q, k, v, q_idx, k_idx):
        with poison_allocations():
            out, lse, kl = fused.sparse_attention_kl_triton(
                q, k, v, topk_idx, q_idx, k_idx, lay, block_size=bs, scale=q.shape[-1] ** -0.5,
                index_scale=q_idx.shape[-1] ** -0.5, reduction=reduction, deterministic=deterministic,
                max_union_waste=max_union_waste)
        fn.node = type(out.grad_fn).__name__
        return out, lse, kl
    return fn


def _assert_close(got, want, tol):
    (vals, grads), (rvals, rgrads) = got, want
    for name, a, b in list(zip(("out", "lse", "kl"), vals, rvals)) + [(n, grads[n], rgrads[n]) for n in rgrads]:
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        assert not torch.isnan(a).any(), f"{name} has NaN (unwritten or invalid)"
        fin = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), fin), f"{name}: -inf pattern differs from the reference"
        a, b = a[fin], b[fin]
        err = float((a - b).norm() / b.norm().clamp_min(1e-12))
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


CASES = [
    # lens, hq, hkv, d, di, block, topk
    ([37, 70, 5], 4, 2, 16, 16, 16, 3),  # packed, odd lengths, a sequence shorter than one block
    ([90], 8, 2, 32, 32, 16, 2),  # G = 4
    ([20, 50], 4, 4, 16, 32, 32, 2),  # G = 1
    ([61, 3], 8, 2, 16, 16, 16, 8),  # topk wider than the visible blocks
]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_fused_matches_the_separate_references(case, deterministic):
    inputs, topk_idx, lay, bs, up = _case(*case)
    fn = _fused(topk_idx, lay, bs, "mean", deterministic)
    got = _run(fn, inputs, up)
    assert fn.node == "_SparseAttentionKLTritonBackward"  # the fused node ran, not the fallback
    _assert_close(got, _run(_reference(topk_idx, lay, bs, "mean"), inputs, up), 2e-5)


def test_fused_context_parallel_zigzag_and_sum_reduction():
    """A rank's two zigzag query chunks against the whole sequence's keys (bottom-right alignment)."""
    lens, cp = [96, 64], 2
    _, cu, ks, kl = zigzag_rank(lens, cp, 1)
    inputs, topk_idx, lay, bs, up = _case([int(x) for x in (cu[1:] - cu[:-1])], 8, 2, 16, 16, 16, 3,
                                          key_layout=(ks, kl))
    fn = _fused(topk_idx, lay, bs, "sum", False)
    got = _run(fn, inputs, up)
    assert fn.node == "_SparseAttentionKLTritonBackward"
    _assert_close(got, _run(_reference(topk_idx, lay, bs, "sum"), inputs, up), 2e-5)


@pytest.mark.slow  # ~25 s under the CPU interpreter
def test_unfused_fallback_and_fusion_agree():
    """Near-random selections take the unfused all-KV-outer KL (union threshold); both paths give
    the same numbers."""
    inputs, topk_idx, lay, bs, up = _case([80, 45], 8, 2, 16, 16, 16, 3)
    plain = _fused(topk_idx, lay, bs, "mean", False, max_union_waste=0.0)
    a = _run(plain, inputs, up)
    assert plain.node == "_SparseAttentionTritonBackward"
    b = _run(_fused(topk_idx, lay, bs, "mean", False), inputs, up)
    _assert_close(a, b, 2e-5)


# G3 (an odd group size) stays in the quick suite; the large groups are slow under the CPU
# interpreter and run in CI's slow step (and on GPUs).
@pytest.mark.parametrize("hq,hkv", [pytest.param(16, 2, id="G8", marks=pytest.mark.slow),
                                    pytest.param(6, 2, id="G3"),
                                    pytest.param(16, 1, id="G16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_kv_pass_key_gradient_for_any_group_size(hq, hkv, deterministic):
    """The KV pass computes the student once per token (not per head row), so every G fuses: padded
    (G = 3), 8 token slots of 16 (G = 8) and 4 of 16 (G = 16)."""
    inputs, topk_idx, lay, bs, up = _case([40, 47], hq, hkv, 16, 16, 16, 3)
    fn = _fused(topk_idx, lay, bs, "mean", deterministic)
    got = _run(fn, inputs, up)
    assert fn.node == "_SparseAttentionKLTritonBackward"
    _assert_close(got, _run(_reference(topk_idx, lay, bs, "mean"), inputs, up), 2e-5)


@pytest.mark.slow  # ~25 s under the CPU interpreter
def test_deterministic_fused_is_bitwise_reproducible():
    inputs, topk_idx, lay, bs, up = _case([70, 33], 8, 2, 16, 16, 16, 3)
    fn = _fused(topk_idx, lay, bs, "mean", True)
    (v1, g1), (v2, g2) = _run(fn, inputs, up), _run(fn, inputs, up)
    assert all(torch.equal(a, b) for a, b in zip(v1, v2))
    assert all(torch.equal(g1[n], g2[n]) for n in g1)


def test_public_op_equals_the_two_calls_on_the_reference_backend(monkeypatch):
    monkeypatch.setenv("MSA_KERNELS_BACKEND", "reference")
    inputs, topk_idx, lay, bs, up = _case([50, 29], 8, 2, 16, 16, 16, 3)
    cu = cu_seqlens_of([50, 29]).to(DEV)

    def together(q, k, v, q_idx, k_idx):
        return msa_kernels.sparse_attention_and_kl(q, k, v, topk_idx, q_idx, k_idx, cu, bs)

    def apart(q, k, v, q_idx, k_idx):
        out, lse = msa_kernels.sparse_attention(q, k, v, topk_idx, cu, bs)
        return out, lse, msa_kernels.indexer_kl(q.detach(), k.detach(), lse.detach(), q_idx, k_idx, topk_idx,
                                                cu, bs)
    (va, ga), (vb, gb) = _run(together, inputs, up), _run(apart, inputs, up)
    assert all(torch.equal(a, b) for a, b in zip(va, vb)) and all(torch.equal(ga[n], gb[n]) for n in ga)
    with pytest.raises(TypeError, match="k_idx dtype"):
        msa_kernels.sparse_attention_and_kl(inputs["q"], inputs["k"], inputs["v"], topk_idx, inputs["q_idx"],
                                            inputs["k_idx"].double(), cu, bs)


@pytest.mark.gpu
@pytest.mark.parametrize("seqlens,hq,hkv", [([8192], 64, 8), ([5000, 11384], 16, 4)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_fused_bf16_matches_fp32_reference(seqlens, hq, hkv, deterministic):
    q_idx_sel = torch.randn(sum(seqlens), hkv, 128, device=DEV, dtype=torch.bfloat16)
    inputs, _, lay, bs, up = _case(seqlens, hq, hkv, 128, 128, 128, 16, dtype=torch.bfloat16, p_empty=0.0)
    cu = cu_seqlens_of(seqlens).to(DEV)
    # Real selections (select_blocks on the index vectors), so the fused path is taken.
    topk_idx = msa_kernels.select_blocks(inputs["q_idx"] + 0.3 * q_idx_sel, inputs["k_idx"], cu, bs, 16)
    fn = _fused(topk_idx, lay, bs, "mean", deterministic, max_union_waste=None)
    got = _run(fn, inputs, up)
    want = _run(_reference(topk_idx, lay, bs, "mean"), {n: x.float() for n, x in inputs.items()}, up)
    _assert_close(got, want, 2e-2)


def test_only_unmodified_select_blocks_output_skips_the_id_check(monkeypatch):
    """sparse_attention's Triton path validates ids with a device sync; it skips that only for a
    live, unmodified select_blocks result, so a user's bad ids still get the clear error."""
    monkeypatch.setenv("MSA_KERNELS_BACKEND", "triton")
    seen = []
    monkeypatch.setattr(triton_fwd, "check_topk_ids", lambda *a: seen.append(a[0]))
    lens, hkv = [70], 2
    cu = cu_seqlens_of(lens).to(DEV)
    q, k, v = (torch.randn(70, h, 16, device=DEV) for h in (4, hkv, hkv))
    qi, ki = torch.randn(70, hkv, 16, device=DEV), torch.randn(70, 16, device=DEV)
    sel = msa_kernels.select_blocks(qi, ki, cu, 16, 3)
    msa_kernels.sparse_attention(q, k, v, sel, cu, 16)
    assert seen == []
    mine = sel.clone()
    msa_kernels.sparse_attention(q, k, v, mine, cu, 16)
    sel[0, 0, 0] = 0  # edited in place: no longer the selection that was made
    msa_kernels.sparse_attention(q, k, v, sel, cu, 16)
    assert seen == [mine, sel]
    monkeypatch.undo()
    monkeypatch.setenv("MSA_KERNELS_BACKEND", "triton")
    bad = mine.clone()
    bad[1, 5, 0] = 9  # block 9 does not exist in a 70-token sequence with 16-token blocks
    with pytest.raises(ValueError, match=r"topk_idx\[1, 5, 0\] = 9"):
        msa_kernels.sparse_attention(q, k, v, bad, cu, 16)


def test_fused_node_skips_the_dq_mode_sync_only_where_the_kl_test_implies_it():
    """The fused node takes the Q-outer dQ pass without dq_mode's host sync, because a union
    schedule that passes the KL's waste test also passes dq_mode's (looser) one."""
    cfg = triton_common.bwd_config(128, 4, 128)
    assert kl_tuning().union_max_waste <= cfg.auto_ratio
