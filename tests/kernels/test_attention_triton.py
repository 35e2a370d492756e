"""Triton sparse attention (forward + backward) against the exact PyTorch reference.

CPU: the kernels run under TRITON_INTERPRET=1 at tiny sizes (fp32 inputs -> ~1e-5 agreement; bf16 /
fp16 inputs within bf16 tolerances). GPU (@pytest.mark.gpu): 8K-32K tokens, 64/4 and 64/8 heads,
d = 128, block 128, top-16, bf16 against a float32 reference. Every run draws fresh random inputs and
poisons every torch.empty allocation with NaN so an unwritten output cannot pass.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from msa_kernels.attention import naive  # noqa: E402
from msa_kernels.attention import triton_common, triton_fwd  # noqa: E402
from msa_kernels.layout import make_layout  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


@pytest.fixture
def poison(monkeypatch):
    """Fill every torch.empty / empty_like allocation with NaN (floats) or garbage (ints)."""
    real_empty, real_like = torch.empty, torch.empty_like

    def _fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-7777)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _fill(real_like(*a, **k)))


def random_topk(pos, seq_rows, hkv, topk, block_size, gen, *, empty_frac=0.0, pad_frac=0.2,
                force_block0=False):
    """int32 [Hkv, T, topk] of valid selections: distinct visible blocks, local block in the last valid
    slot, -1 padding; ``empty_frac`` of the (group, token) rows are all -1, ``pad_frac`` of the rows keep
    fewer blocks than they could."""
    t = pos.numel()
    own = (pos // block_size).to(torch.int64)  # [T]
    nb = int(own.max().item()) + 1 if t else 1
    scores = torch.rand((hkv, t, nb), generator=gen, device=pos.device)
    cols = torch.arange(nb, device=pos.device)
    visible_other = cols[None, None, :] < own[None, :, None]
    if force_block0:
        scores = torch.where(cols[None, None, :] == 0, torch.full_like(scores, 2.0), scores)
    scores = torch.where(visible_other, scores, torch.full_like(scores, -1.0))
    kk = min(topk - 1, nb)
    top_s, top_i = torch.topk(scores, kk, dim=-1) if kk > 0 else (scores[..., :0], scores[..., :0].long())
    n_other = torch.minimum(own, torch.full_like(own, topk - 1))[None].expand(hkv, t).clone()
    shrink = torch.rand((hkv, t), generator=gen, device=pos.device) < pad_frac
    n_other = torch.where(shrink, (n_other.float() * torch.rand((hkv, t), generator=gen, device=pos.device)).long(),
                          n_other)
    out = torch.full((hkv, t, topk), -1, dtype=torch.int64, device=pos.device)
    slot = torch.arange(topk, device=pos.device)
    if kk > 0:
        keep = slot[None, None, :kk] < n_other[..., None]
        out[..., :kk] = torch.where(keep & (top_s >= 0), top_i, torch.full_like(top_i, -1))
    local_slot = n_other.clamp(max=topk - 1)
    out.scatter_(-1, local_slot[..., None], own[None, :, None].expand(hkv, t, 1))
    empty = torch.rand((hkv, t), generator=gen, device=pos.device) < empty_frac
    out[empty] = -1
    return out.to(torch.int32)


def make_case(seqlens, hq, hkv, dim, block_size, topk, dtype, *, seed, scale_q=1.0, cp_layout=None, **kw):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    cu = torch.tensor([0] + list(torch.tensor(seqlens).cumsum(0).tolist()), dtype=torch.int32, device=DEV)
    if cp_layout is None:
        layout = make_layout(cu, total_keys=int(cu[-1]))
        tk = int(cu[-1])
    else:
        ks, kl, tk = cp_layout
        layout = make_layout(cu, torch.tensor(ks, dtype=torch.int32, device=DEV),
                             torch.tensor(kl, dtype=torch.int32, device=DEV), total_keys=tk)
    t = int(cu[-1])
    pos = layout.token_positions()
    topk_idx = random_topk(pos, None, hkv, topk, block_size, gen, **kw)
    q = (torch.randn((t, hq, dim), generator=gen, device=DEV) * scale_q).to(dtype)
    k = torch.randn((tk, hkv, dim), generator=gen, device=DEV).to(dtype)
    v = torch.randn((tk, hkv, dim), generator=gen, device=DEV).to(dtype)
    return q, k, v, topk_idx, layout, gen


def run_both(q, k, v, topk_idx, layout, block_size, gen, *, deterministic=False, with_dlse=True):
    """(triton out, lse, grads) and (fp32 reference out, lse, grads) for the same upstream gradients."""
    go = torch.randn(q.shape, generator=gen, device=q.device).to(q.dtype)
    gl = torch.randn(q.shape[:2], generator=gen, device=q.device) if with_dlse else None
    scale = q.shape[-1] ** -0.5

    def grads(fn, *xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        out, lse = fn(*xs)
        lse_grad = None if gl is None else torch.where(torch.isinf(lse), torch.zeros_like(gl), gl)
        tensors = [out] + ([lse] if gl is not None else [])
        torch.autograd.backward(tensors, [go.to(out.dtype)] + ([lse_grad] if gl is not None else []))
        return out.detach(), lse.detach(), [x.grad for x in xs]

    tri = grads(lambda a, b, c: triton_fwd.sparse_attention_triton(
        a, b, c, topk_idx, layout, block_size=block_size, scale=scale, deterministic=deterministic), q, k, v)
    ref = grads(lambda a, b, c: naive.sparse_attention_ref(
        a, b, c, topk_idx, layout, block_size=block_size, scale=scale), q.float(), k.float(), v.float())
    return tri, ref


def assert_close(tri, ref, tol):
    out, lse, grads = tri
    rout, rlse, rgrads = ref
    for name, a, b in [("out", out, rout), ("lse", lse, rlse)] + list(zip(("dq", "dk", "dv"), grads, rgrads)):
        a = a.float()
        assert not torch.isnan(a).any(), f"{name} has NaN (unwritten or invalid)"
        fin = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), fin), f"{name}: -inf pattern differs from the reference"
        a, b = a[fin], b[fin]
        err = (a - b).norm() / b.norm().clamp_min(1e-6)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


# -- CPU (interpreter) parity: small shapes, every head layout family ----------------------------------

@pytest.mark.parametrize("hq,hkv,dim,block,topk,dtype,tol", [
    (8, 2, 32, 16, 3, torch.float32, 1e-5),     # G = 4
    (4, 4, 16, 16, 4, torch.float32, 1e-5),     # G = 1 (8/8-like): 16 tokens per tile
    (6, 2, 16, 32, 2, torch.float32, 1e-5),     # G = 3: padded group rows
    (16, 2, 64, 16, 5, torch.bfloat16, 2e-2),   # 16/2, bf16 inputs vs fp32 reference
    (16, 1, 32, 16, 4, torch.float16, 5e-3),    # G = 16 (one token per 16-row tile), fp16
])
def test_parity_head_layouts(poison, hq, hkv, dim, block, topk, dtype, tol):
    q, k, v, topk_idx, layout, gen = make_case([37, 70], hq, hkv, dim, block, topk, dtype, seed=hq * 31 + dim)
    tri, ref = run_both(q, k, v, topk_idx, layout, block, gen)
    assert tri[0].dtype == dtype and tri[1].dtype == torch.float32
    assert_close(tri, ref, tol)


def test_edge_cases_packed(poison):
    """Many packed sequences: empty fragments, sequences shorter than one block, lengths that are not a
    multiple of the block, -1 padded and fully empty rows, block 0 picked by every query, logits >= 30."""
    seqlens = [5, 0, 16, 33, 1, 47]
    q, k, v, topk_idx, layout, gen = make_case(seqlens, 4, 2, 16, 16, 4, torch.float32, seed=7, scale_q=6.0,
                                               empty_frac=0.15, pad_frac=0.4, force_block0=True)
    assert (topk_idx < 0).all(-1).any(), "the case must hold fully empty rows"
    scores = torch.einsum("thd,tgd->th", q, k.repeat_interleave(2, 1)) * 0.25
    assert scores.abs().max() > 30
    tri, ref = run_both(q, k, v, topk_idx, layout, 16, gen)
    assert_close(tri, ref, 1e-5)
    empty = (topk_idx < 0).all(-1).transpose(0, 1).repeat_interleave(2, 1)  # [T, Hq]
    assert torch.isneginf(tri[1][empty]).all() and (tri[0][empty] == 0).all()
    assert (tri[2][0][empty] == 0).all()


def test_duplicate_ids_count_once(poison):
    q, k, v, topk_idx, layout, gen = make_case([40], 4, 2, 16, 16, 3, torch.float32, seed=3)
    topk_idx[..., 0] = topk_idx[..., -1].clamp_min(0)  # the local block twice in many rows
    tri, ref = run_both(q, k, v, topk_idx, layout, 16, gen)
    assert_close(tri, ref, 1e-5)


def test_context_parallel_zigzag_matches_full_sequence(poison):
    """A CP=2 rank holding zigzag chunks 1 and 2 of a 4-chunk sequence (plus a second packed sequence
    split the same way) gives the rows and key gradients the full-sequence call gives."""
    c, hq, hkv, dim, block = 12, 4, 2, 16, 16
    q, k, v, topk_idx, layout, gen = make_case([4 * c, 4 * c], hq, hkv, dim, block, 3, torch.float32, seed=11)
    go = torch.randn(q.shape, generator=gen)
    full = triton_fwd.sparse_attention_triton(*(x.clone().requires_grad_() for x in (q, k, v)), topk_idx, layout,
                                              block_size=block, scale=0.25)
    rows = torch.cat([torch.arange(s + c, s + 3 * c) for s in (0, 4 * c)])
    cu = torch.tensor([0, c, 2 * c, 3 * c, 4 * c], dtype=torch.int32)
    cp_layout = make_layout(cu, torch.tensor([0, 0, 4 * c, 4 * c], dtype=torch.int32),
                            torch.tensor([2 * c, 3 * c, 2 * c, 3 * c], dtype=torch.int32), total_keys=8 * c)
    xs = [q[rows].clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_()]
    out, lse = triton_fwd.sparse_attention_triton(*xs, topk_idx[:, rows].contiguous(), cp_layout,
                                                  block_size=block, scale=0.25)
    torch.testing.assert_close(out, full[0][rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full[1][rows], atol=1e-5, rtol=1e-5)
    # Key gradients: the full call restricted to the same query rows' upstream gradient.
    xf = [x.clone().requires_grad_() for x in (q, k, v)]
    fo, _ = triton_fwd.sparse_attention_triton(*xf, topk_idx, layout, block_size=block, scale=0.25)
    mask = torch.zeros(q.shape[0], 1, 1)
    mask[rows] = 1
    (fo * go * mask).sum().backward()
    (out * go[rows]).sum().backward()
    torch.testing.assert_close(xs[0].grad, xf[0].grad[rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xs[1].grad, xf[1].grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xs[2].grad, xf[2].grad, atol=1e-5, rtol=1e-5)


def test_deterministic_mode_is_bitwise_reproducible(poison):
    q, k, v, topk_idx, layout, gen = make_case([30, 50], 8, 2, 16, 16, 3, torch.float32, seed=5,
                                               force_block0=True)
    runs = [run_both(q, k, v, topk_idx, layout, 16, torch.Generator().manual_seed(1), deterministic=True)
            for _ in range(2)]
    assert_close(runs[0][0], runs[0][1], 1e-5)
    for a, b in zip(runs[0][0][2], runs[1][0][2]):
        assert torch.equal(a, b)


def test_schedules_cover_every_pick():
    """Union tiles and the reverse CSR hold exactly the (group, token, block) picks, once each."""
    gen = torch.Generator().manual_seed(0)
    pos = torch.cat([torch.arange(50), torch.arange(20)])
    cu = torch.tensor([0, 50, 70], dtype=torch.int32)
    layout = make_layout(cu, total_keys=70)
    topk_idx = random_topk(pos, None, 3, 4, 16, gen, empty_frac=0.1)
    rows = triton_common.block_key_rows(topk_idx, layout, 16)
    want = {(r, t, int(b)) for r in range(3) for t in range(70) for b in rows[r, t].tolist() if b >= 0}
    tiles = triton_common.build_q_tiles(rows, 4)
    got = set()
    for r in range(3):
        for tile in range(tiles.num_tiles):
            n = int(tiles.counts[r, tile])
            blocks = tiles.block_rows[r, tile, :n].tolist()
            assert blocks == sorted(set(blocks))
            for b, m in zip(blocks, tiles.token_masks[r, tile, :n].tolist()):
                got |= {(r, tile * 4 + i, b) for i in range(4) if m >> i & 1}
    assert got == want
    for chunk in (3, 0):
        units = triton_common.build_kv_units(rows, chunk, 70, 4 + 2)
        got, n = set(), 0
        for u in range(units.num_units):
            a, b = int(units.unit_begin[u]), int(units.unit_end[u])
            assert 0 <= b - a <= (3 if chunk else 70)
            picks = [t for t in units.tokens[a:b].tolist() if t >= 0]
            n += len(picks)
            got |= {(int(units.unit_group[u]), t, int(units.unit_block_row[u])) for t in picks}
        assert got == want and n == len(want)  # every pick once, in exactly one unit


def test_bad_input_names_the_argument():
    q, k, v, topk_idx, layout, _ = make_case([20], 4, 2, 16, 16, 2, torch.float32, seed=0)
    with pytest.raises(ValueError, match="topk_idx"):
        triton_fwd.sparse_attention_triton(q, k, v, topk_idx + 5, layout, block_size=16, scale=0.25)
    with pytest.raises(ValueError, match="head dim"):
        triton_fwd.sparse_attention_triton(q[..., :12], k[..., :12], v[..., :12], topk_idx, layout,
                                           block_size=16, scale=0.25)
    with pytest.raises(ValueError, match="block_size"):
        triton_fwd.sparse_attention_triton(q, k, v, topk_idx, layout, block_size=24, scale=0.25)


# -- GPU parity at real sizes ----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("seqlens,hq,hkv", [
    ([8192], 64, 8), ([3000, 5192], 64, 4), ([32768], 64, 8), ([20000, 12768], 64, 4),
])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_parity_bf16(seqlens, hq, hkv, deterministic):
    q, k, v, topk_idx, layout, gen = make_case(seqlens, hq, hkv, 128, 128, 16, torch.bfloat16,
                                               seed=sum(seqlens) + hkv, empty_frac=0.001, force_block0=True)
    tri, ref = run_both(q, k, v, topk_idx, layout, 128, gen, deterministic=deterministic)
    assert_close(tri, ref, 1.5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,dim,block,topk,dtype", [
    (32, 4, 64, 64, 32, torch.float16),
    (16, 2, 128, 64, 1, torch.bfloat16),
    (8, 8, 64, 128, 32, torch.bfloat16),
    (64, 4, 64, 128, 7, torch.float16),
])
def test_gpu_parity_other_configs(hq, hkv, dim, block, topk, dtype):
    """The remaining head layouts, D = 64, block 64, top-1 and top-32, fp16, on packed sequences."""
    q, k, v, topk_idx, layout, gen = make_case([1500, 37, 2600], hq, hkv, dim, block, topk, dtype,
                                               seed=hq + dim + topk, empty_frac=0.01, force_block0=True)
    for deterministic in (False, True):
        tri, ref = run_both(q, k, v, topk_idx, layout, block, gen, deterministic=deterministic)
        assert_close(tri, ref, 1.5e-2)


def test_fp32_inputs_multiply_in_fp32_unless_tf32_is_allowed():
    """fp32 training must mean fp32 products (as in torch's own matmuls), TF32 only on opt-in."""
    from msa_kernels.triton_utils import dot_precision

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert triton_common.dot_mode(torch.float32) == triton_common.DOT_IEEE
        assert dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")  # = torch.backends.cuda.matmul.allow_tf32 = True
        assert triton_common.dot_mode(torch.float32) == triton_common.DOT_NATIVE
        assert dot_precision(torch.float32) == "tf32"
        assert triton_common.dot_mode(torch.float16) == triton_common.DOT_NATIVE
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_fp32_matches_the_reference_to_fp32_precision(deterministic):
    """With fp32 inputs (TF32 off, torch's default) forward and backward agree with the fp32
    reference to ~1e-6, not to TF32's ~1e-3: the exact-parity checks of the parallel layouts rely on it."""
    assert torch.get_float32_matmul_precision() == "highest"
    q, k, v, topk_idx, layout, gen = make_case([1500, 2600], 16, 4, 128, 128, 16, torch.float32, seed=5,
                                               force_block0=True)
    tri, ref = run_both(q, k, v, topk_idx, layout, 128, gen, deterministic=deterministic)
    assert_close(tri, ref, 2e-5)


@pytest.mark.gpu
def test_gpu_deterministic_is_bitwise_reproducible():
    q, k, v, topk_idx, layout, _ = make_case([5000, 3192], 64, 8, 128, 128, 16, torch.bfloat16, seed=9,
                                             force_block0=True)
    runs = [run_both(q, k, v, topk_idx, layout, 128, torch.Generator(device=DEV).manual_seed(4),
                     deterministic=True)[0] for _ in range(2)]
    for a, b in zip([runs[0][0]] + runs[0][2], [runs[1][0]] + runs[1][2]):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """q has more than 2^31 elements: row * stride must not wrap (checked on the last sequences)."""
    n_seq, seq = 130, 2048  # 266240 tokens x 64 heads x 128 > 2^31
    q, k, v, topk_idx, layout, gen = make_case([seq] * n_seq, 64, 4, 128, 128, 4, torch.bfloat16, seed=2)
    assert q.numel() > 2 ** 31
    out, lse = triton_fwd.sparse_attention_triton(q, k, v, topk_idx, layout, block_size=128, scale=128 ** -0.5)
    tail = slice((n_seq - 2) * seq, n_seq * seq)
    sub = make_layout(torch.tensor([0, seq, 2 * seq], dtype=torch.int32, device=DEV), total_keys=2 * seq)
    ro, rl = naive.sparse_attention_ref(q[tail].float(), k[tail].float(), v[tail].float(),
                                        topk_idx[:, tail].contiguous(), sub, block_size=128, scale=128 ** -0.5)
    assert ((out[tail].float() - ro).norm() / ro.norm()) < 1e-2
    torch.testing.assert_close(lse[tail], rl, atol=2e-2, rtol=0)


@pytest.mark.parametrize("mode", ["atomic", "qouter"])
def test_dq_modes_match_reference(poison, mode):
    """Both dQ strategies of the non-deterministic backward (the default picks one per call)."""
    q, k, v, topk_idx, layout, gen = make_case([45, 26], 8, 2, 16, 16, 4, torch.float32, seed=17,
                                               force_block0=True)
    cfg = dataclasses.replace(triton_common.bwd_config(16, 4, 16, interpret=True), dq_mode=mode)
    go = torch.randn(q.shape, generator=gen)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    out, _ = triton_fwd.sparse_attention_triton(*xs, topk_idx, layout, block_size=16, scale=0.25, bwd_cfg=cfg)
    out.backward(go)
    rs = [x.clone().requires_grad_() for x in (q, k, v)]
    ro, _ = naive.sparse_attention_ref(*rs, topk_idx, layout, block_size=16, scale=0.25)
    ro.backward(go)
    for name, a, b in zip(("dq", "dk", "dv"), xs, rs):
        torch.testing.assert_close(a.grad, b.grad, atol=2e-5, rtol=2e-5, msg=name)
