"""The chunked PyTorch reference (msa_kernels on CPU) against brute-force dense-masked formulas.

Tiny inputs, float64 brute force with plain autograd; every run allocates under NaN poisoning.
"""
from __future__ import annotations

import msa_kernels as mk
import pytest
import torch
from msa_kernels import layout as mk_layout
from msa_kernels.select.naive import block_scores_ref

from .reference_utils import (
    assert_close,
    assert_same_selection,
    brute_attention,
    brute_block_scores,
    brute_kl,
    brute_kl_dense,
    brute_select,
    cu_seqlens_of,
    poison_allocations,
    random_topk,
    selection_mask,
    visible_mask,
    zigzag_rank,
)

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("MSA_KERNELS_BACKEND", "reference")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, gen, scale=1.0, dtype=torch.float32, grad=False):
    t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return t.requires_grad_(grad)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


# ----------------------------------------------------------------------------- layout
def test_layout_defaults_and_cp_positions():
    lay = mk.make_layout(cu_seqlens_of([5, 0, 7]), total_keys=12)
    assert lay.is_self and lay.num_fragments == 3 and lay.max_q_len == 7
    assert lay.token_positions().tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]
    assert lay.num_blocks(4).tolist() == [2, 0, 2] and lay.max_blocks(4) == 2
    assert lay.q_starts.dtype == lay.k_starts.dtype == torch.int64
    # zigzag rank 0 of cp=2 over one sequence of 8: chunks 0 and 3
    _, cu, ks, kl = zigzag_rank([8], 2, 0)
    lay = mk.make_layout(cu, ks, kl, total_keys=8)
    assert lay.token_positions().tolist() == [0, 1, 6, 7]
    assert lay.token_fragment().tolist() == [0, 0, 1, 1]
    assert [f.pos_offset for f in lay] == [0, 6]


def test_cached_layout_reuses_until_the_offsets_change():
    cu = cu_seqlens_of([5, 7])
    first = mk_layout.cached_layout(cu, total_keys=12)
    assert mk_layout.cached_layout(cu, total_keys=12) is first
    assert mk_layout.cached_layout(cu_seqlens_of([5, 7]), total_keys=12) is not first  # another tensor
    cu[1] = 6  # in-place edit bumps the version counter
    again = mk_layout.cached_layout(cu, total_keys=12)
    assert again is not first and [f.q_len for f in again] == [6, 6]
    with torch.inference_mode():
        cu_inf = cu_seqlens_of([3])
        assert mk_layout.cached_layout(cu_inf, total_keys=3).total_q == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(cu_seqlens=torch.tensor([0, 4], dtype=torch.int64), total_keys=4), "cu_seqlens must have dtype"),
    (dict(cu_seqlens=torch.tensor([1, 4], dtype=torch.int32), total_keys=4), r"cu_seqlens\[0\]"),
    (dict(cu_seqlens=torch.tensor([0, 4, 3], dtype=torch.int32), total_keys=3), "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 4], dtype=torch.int32), total_keys=5), "key_starts and key_lens"),
    (dict(cu_seqlens=torch.tensor([0, 4], dtype=torch.int32), key_starts=torch.tensor([0], dtype=torch.int32),
          total_keys=4), "given together"),
    (dict(cu_seqlens=torch.tensor([0, 4], dtype=torch.int32), key_starts=torch.tensor([0], dtype=torch.int32),
          key_lens=torch.tensor([3], dtype=torch.int32), total_keys=8), r"key_lens\[0\] = 3 must be >="),
    (dict(cu_seqlens=torch.tensor([0, 4], dtype=torch.int32), key_starts=torch.tensor([6], dtype=torch.int32),
          key_lens=torch.tensor([4], dtype=torch.int32), total_keys=8), r"key_starts\[0\] \+ key_lens\[0\]"),
    (dict(cu_seqlens=torch.tensor([0, 4], dtype=torch.int32), key_starts=torch.tensor([0, 0], dtype=torch.int32),
          key_lens=torch.tensor([4, 4], dtype=torch.int32), total_keys=8), "key_starts must have one entry"),
])
def test_layout_validation_names_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        mk.make_layout(**kwargs)


def test_api_validation_names_the_argument():
    g = _gen(0)
    cu = cu_seqlens_of([6])
    q, k = _randn(6, 4, 8, gen=g), _randn(6, 2, 8, gen=g)
    qi, ki = _randn(6, 2, 4, gen=g), _randn(6, 4, gen=g)
    idx = mk.select_blocks(qi, ki, cu, 4, 2)
    with pytest.raises(ValueError, match="q heads"):
        mk.sparse_attention(q[:, :3], k, k, idx, cu, 4)
    with pytest.raises(ValueError, match=r"v must have shape"):
        mk.sparse_attention(q, k, k[:, :1], idx, cu, 4)
    with pytest.raises(TypeError, match="topk_idx must have dtype"):
        mk.sparse_attention(q, k, k, idx.long(), cu, 4)
    bad = idx.clone()
    bad[0, 5, 0] = 2  # sequence of 6 tokens has blocks 0 and 1 only
    with pytest.raises(ValueError, match=r"topk_idx\[0, 5, 0\] = 2"):
        mk.sparse_attention(q, k, k, bad, cu, 4)
    with pytest.raises(TypeError, match="v dtype"):
        mk.sparse_attention(q, k, k.double(), idx, cu, 4)
    with pytest.raises(TypeError, match="lse must be float32"):
        mk.indexer_kl(q, k, torch.zeros(6, 4, dtype=torch.float64), qi, ki, idx, cu, 4)
    with pytest.raises(ValueError, match="reduction"):
        mk.indexer_kl(q, k, torch.zeros(6, 4), qi, ki, idx, cu, 4, reduction="avg")
    with pytest.raises(ValueError, match="k_idx must have shape"):
        mk.select_blocks(qi, ki[:, :3], cu, 4, 2)
    with pytest.raises(ValueError, match="topk must be"):
        mk.select_blocks(qi, ki, cu, 4, 0)
    with pytest.raises(ValueError, match="local_window"):
        mk.select_blocks(qi, ki, cu, 4, 2, local_window=-1)
    with pytest.raises(ValueError, match="index_scale"):
        mk.select_blocks(qi, ki, cu, 4, 2, index_scale=float("nan"))
    with pytest.raises(ValueError, match="cu_seqlens"):
        mk.select_blocks(qi, ki, cu_seqlens_of([5]), 4, 2)


def test_backend_env_and_missing_triton_module(monkeypatch):
    t = torch.zeros(1)
    monkeypatch.setenv("MSA_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MSA_KERNELS_BACKEND"):
        mk.backend_for(t)
    monkeypatch.setenv("MSA_KERNELS_BACKEND", "auto")
    assert mk.backend_for(t) == "reference"  # CPU tensors
    # A missing kernel module or entry point never falls back to the slow reference: it raises.
    with pytest.raises(ImportError, match="attention.kernels=reference"):
        mk._load_triton("select.not_written_yet", "fn_a")
    with pytest.raises(ImportError, match="has no fn_b"):
        mk._load_triton("layout", "fn_b")


def test_backend_argument_overrides_the_environment(monkeypatch):
    class FakeCuda:
        is_cuda = True

    monkeypatch.setenv("MSA_KERNELS_BACKEND", "triton")
    assert mk.backend_for(torch.zeros(1), "reference") == "reference"
    assert mk.backend_for(torch.zeros(1), "auto") == "reference"  # CPU tensors
    monkeypatch.setattr(mk, "_triton_available", lambda: True)
    assert mk.backend_for(FakeCuda(), "auto") == "triton"
    with pytest.raises(ValueError, match="backend must be one of"):
        mk.backend_for(torch.zeros(1), "fast")
    # The argument reaches the dispatch of a public op: triton on CPU without the interpreter
    # would raise, the reference answers.
    q = torch.randn(9, 2, 4)
    k_idx = torch.randn(9, 4)
    cu = torch.tensor([0, 9], dtype=torch.int32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = mk.select_blocks(q, k_idx, cu, 4, 2, backend="reference")
    assert out.shape == (2, 9, 2)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        mk.select_blocks(q, k_idx, cu, 4, 2, backend="triton")


def test_cuda_without_triton_warns_once_loudly(monkeypatch, caplog):
    """auto on CUDA tensors without Triton runs the reference, but never silently (and only once)."""
    class FakeCuda:
        is_cuda = True

    monkeypatch.setenv("MSA_KERNELS_BACKEND", "auto")
    monkeypatch.setattr(mk, "_triton_available", lambda: False)
    monkeypatch.setattr(mk, "_warned", set())
    with pytest.warns(RuntimeWarning, match="Triton is not installed"):
        assert mk.backend_for(FakeCuda()) == "reference"
    assert any("attention.kernels=reference" in r.getMessage() for r in caplog.records)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mk.backend_for(FakeCuda()) == "reference"  # the second call stays quiet


# ----------------------------------------------------------------------------- select_blocks
SELECT_CASES = [
    # lens, hkv, di, block, topk
    ([13, 3, 22], 2, 8, 4, 3),          # packed, lengths not multiple of block, short sequence
    ([2, 5], 1, 4, 8, 2),                # sequences shorter than one block
    ([40], 3, 8, 8, 1),                  # topk = 1: only the local block
    ([33, 17], 2, 16, 16, 8),            # topk wider than the visible blocks
    ([48, 9, 31], 2, 8, 4, 5),
]


@pytest.mark.parametrize("lens, hkv, di, block, topk", SELECT_CASES)
def test_select_blocks_matches_brute_force(lens, hkv, di, block, topk):
    g = _gen(sum(lens) + topk)
    cu = cu_seqlens_of(lens)
    qi, ki = _randn(sum(lens), hkv, di, gen=g), _randn(sum(lens), di, gen=g)
    with poison_allocations():
        got = mk.select_blocks(qi, ki, cu, block, topk)
    want = brute_select(qi, ki, cu, block, topk)
    assert got.dtype == torch.int32 and got.shape == (hkv, sum(lens), topk)
    assert torch.equal(got, want)


def test_select_blocks_chunked_and_scaled(monkeypatch):
    monkeypatch.setattr(mk_layout, "REFERENCE_CHUNK_ELEMENTS", 64)  # ~1-2 queries per chunk
    g = _gen(7)
    cu = cu_seqlens_of([29, 19])
    qi, ki = _randn(48, 2, 8, gen=g, scale=6.0), _randn(48, 8, gen=g, scale=6.0)  # logits >= 30
    got = mk.select_blocks(qi, ki, cu, 4, 4, index_scale=0.7)
    assert torch.equal(got, brute_select(qi, ki, cu, 4, 4, index_scale=0.7))
    scores = block_scores_ref(qi, ki, mk.make_layout(cu, total_keys=48), block_size=4, index_scale=0.7)
    brute = brute_block_scores(qi, ki, cu, 4, index_scale=0.7)
    assert scores.abs().nan_to_num(posinf=0).max() >= 30
    assert_close(scores.nan_to_num(neginf=-1e30), brute.nan_to_num(neginf=-1e30), "block scores", atol=1e-4)


def test_select_blocks_ties_prefer_lower_block_id():
    # Integer-valued inputs make every dot product exact, so equal keys give bit-identical block maxima.
    cu = cu_seqlens_of([24])
    ki = torch.ones(24, 4)
    ki[8:12] = 2.0  # block 2 strictly best; blocks 0, 1, 3, 4 tie
    qi = torch.ones(24, 1, 4)
    got = mk.select_blocks(qi, ki, cu, 4, 4, index_scale=1.0)
    assert got[0, 23].tolist() == [2, 0, 1, 5]
    assert got[0, 13].tolist() == [2, 0, 1, 3]
    assert got[0, 9].tolist() == [0, 1, 2, -1]  # block 2 is local here: last valid slot
    assert torch.equal(got, brute_select(qi, ki, cu, 4, 4, index_scale=1.0))


def test_select_blocks_same_block_for_every_query():
    g = _gen(3)
    cu = cu_seqlens_of([30, 18])
    qi = _randn(48, 2, 8, gen=g).abs() + 0.1
    ki = _randn(48, 8, gen=g) * 0.01
    ki[0] = 50.0  # the first token of sequence 0 dominates every score in sequence 0
    ki[30] = 50.0
    got = mk.select_blocks(qi, ki, cu, 4, 2)
    assert torch.equal(got, brute_select(qi, ki, cu, 4, 2))
    for r in range(2):
        for i in list(range(4, 30)) + list(range(34, 48)):
            assert got[r, i, 0].item() == 0, (r, i)
    # the attention ops on this selection: block 0 of each sequence is read by every query
    q, k, v = _randn(48, 4, 8, gen=g), _randn(48, 2, 8, gen=g), _randn(48, 2, 8, gen=g)
    _check_attention(q, k, v, got, cu, 4, g=g)


@pytest.mark.parametrize("force_sink, local_window, topk", [(True, 0, 3), (False, 2, 4), (True, 2, 3),
                                                            (True, 3, 2), (False, 5, 8)])
def test_select_blocks_forced_sink_and_window(force_sink, local_window, topk):
    g = _gen(11 + local_window)
    cu = cu_seqlens_of([37, 14])
    qi, ki = _randn(51, 2, 8, gen=g), _randn(51, 8, gen=g)
    got = mk.select_blocks(qi, ki, cu, 4, topk, force_sink=force_sink, local_window=local_window)
    want = brute_select(qi, ki, cu, 4, topk, force_sink=force_sink, local_window=local_window)
    assert torch.equal(got, want)
    # forced blocks are present whenever the budget allows them
    pos, budget = 36, topk - 1
    forced = ([0] if force_sink else []) + [pos // 4 - d for d in range(1, local_window + 1)]
    assert set(forced[:budget]) <= set(got[0, 36].tolist())


# ----------------------------------------------------------------------------- sparse_attention
ATTN_CASES = [
    # lens, hq, hkv, d, block, topk
    ([13, 3, 22], 8, 2, 8, 4, 3),
    ([17, 9], 4, 4, 16, 8, 2),
    ([25, 6], 6, 3, 8, 16, 2),
    ([40], 4, 2, 8, 4, 1),
    ([11, 2, 19], 4, 1, 4, 4, 16),    # topk wider than any visible set
]


def _attention_case(lens, hq, hkv, d, block, topk, seed, *, scale=1.0, p_empty=0.1, dtype=torch.float32):
    g = _gen(seed)
    t = sum(lens)
    cu = cu_seqlens_of(lens)
    q, k, v = (_randn(t, h, d, gen=g, scale=scale, dtype=dtype) for h in (hq, hkv, hkv))
    idx = random_topk(cu, hkv, block, topk, generator=g, p_empty=p_empty)
    return cu, q, k, v, idx


def _check_attention(q, k, v, idx, cu, block, *, g, atol=1e-5, **cp):
    q, k, v = _leaf(q), _leaf(k), _leaf(v)
    with poison_allocations():
        out, lse = mk.sparse_attention(q, k, v, idx, cu, block, **cp)
    do, dl = _randn(*out.shape, gen=g), _randn(*lse.shape, gen=g)
    fin = torch.isfinite(lse)
    with poison_allocations():
        ((out.float() * do).sum() + (lse[fin] * dl[fin]).sum()).backward()
    q2, k2, v2 = _leaf(q.double()), _leaf(k.double()), _leaf(v.double())
    mask = selection_mask(idx, cu, k.shape[0], block, cp.get("key_starts"), cp.get("key_lens"))
    out2, lse2 = brute_attention(q2, k2, v2, mask, cp.get("scale"))
    ((out2 * do.double()).sum() + (lse2[fin] * dl.double()[fin]).sum()).backward()
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert torch.equal(torch.isinf(lse), torch.isinf(lse2)), "empty-support rows must give lse = -inf"
    assert_close(out, out2, "out", atol=atol, rtol=atol)
    assert_close(lse[fin], lse2[fin], "lse", atol=atol, rtol=atol)
    for name, a, b in (("dq", q, q2), ("dk", k, k2), ("dv", v, v2)):
        assert_close(a.grad, b.grad, name, atol=atol * 4, rtol=atol * 4)
    return out, lse


@pytest.mark.parametrize("lens, hq, hkv, d, block, topk", ATTN_CASES)
def test_sparse_attention_forward_and_grads_match_brute_force(lens, hq, hkv, d, block, topk):
    g = _gen(100 + sum(lens))
    cu, q, k, v, idx = _attention_case(lens, hq, hkv, d, block, topk, seed=sum(lens))
    out, _ = _check_attention(q, k, v, idx, cu, block, g=g)
    empty = (idx < 0).all(-1)  # [Hkv, T]
    if empty.any():
        r, i = empty.nonzero()[0].tolist()
        g_heads = hq // hkv
        assert torch.all(out[i, r * g_heads:(r + 1) * g_heads] == 0)


def test_sparse_attention_on_selected_blocks_large_logits_chunked(monkeypatch):
    monkeypatch.setattr(mk_layout, "REFERENCE_CHUNK_ELEMENTS", 200)
    g = _gen(5)
    lens = [27, 5, 20]
    cu = cu_seqlens_of(lens)
    _, q, k, v, _ = _attention_case(lens, 8, 2, 8, 4, 3, seed=5, scale=4.0)
    qi, ki = _randn(52, 2, 8, gen=g), _randn(52, 8, gen=g)
    idx = mk.select_blocks(qi, ki, cu, 4, 3)
    logits = torch.einsum("thd,jhd->htj", q.double(), k.double().repeat_interleave(4, 1)) * 0.5
    assert logits.abs().max() >= 30
    # fp32 rounding of logits ~50 is ~5e-6 absolute, which exp() carries into p: looser tolerance.
    _check_attention(q, k, v, idx, cu, 4, g=g, scale=0.5, atol=1e-4)


def test_sparse_attention_bf16_keeps_dtype_and_matches_fp32():
    cu, q, k, v, idx = _attention_case([21, 12], 4, 2, 8, 4, 2, seed=9, dtype=torch.bfloat16, p_empty=0.0)
    out, lse = mk.sparse_attention(q, k, v, idx, cu, 4)
    out32, lse32 = mk.sparse_attention(q.float(), k.float(), v.float(), idx, cu, 4)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert_close(out, out32, "bf16 out", atol=1e-2, rtol=1e-2)
    assert_close(lse, lse32, "bf16 lse", atol=1e-5, rtol=1e-5)  # both from the same bf16 values in fp32


# ----------------------------------------------------------------------------- indexer KL
KL_CASES = [
    # lens, hq, hkv, d, di, block, topk
    ([13, 3, 22], 8, 2, 8, 4, 4, 3),
    ([17, 9], 4, 4, 8, 8, 8, 2),
    ([25, 6], 6, 3, 4, 8, 16, 2),
    ([30], 4, 2, 8, 4, 4, 1),
]


def _kl_inputs(lens, hq, hkv, d, di, seed, scale=1.0):
    g = _gen(seed)
    t = sum(lens)
    q, k = _randn(t, hq, d, gen=g, scale=scale), _randn(t, hkv, d, gen=g, scale=scale)
    qi, ki = _randn(t, hkv, di, gen=g, grad=True), _randn(t, di, gen=g, grad=True)
    return g, q, k, qi, ki


@pytest.mark.parametrize("lens, hq, hkv, d, di, block, topk", KL_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_indexer_kl_value_and_grads_match_brute_force(lens, hq, hkv, d, di, block, topk, reduction):
    g, q, k, qi, ki = _kl_inputs(lens, hq, hkv, d, di, seed=sum(lens) + topk)
    cu = cu_seqlens_of(lens)
    idx = random_topk(cu, hkv, block, topk, generator=g, p_empty=0.1)
    v = _randn(*k.shape, gen=g)
    q, k = _leaf(q), _leaf(k)
    _, lse = mk.sparse_attention(q, k, v, idx, cu, block)
    lse = lse.detach().requires_grad_(True)
    with poison_allocations():
        kl = mk.indexer_kl(q, k, lse, qi, ki, idx, cu, block, reduction=reduction)
        kl.backward()
    assert kl.dim() == 0 and kl.dtype == torch.float32
    assert q.grad is None and k.grad is None and lse.grad is None  # teacher is detached
    qi2, ki2 = _leaf(qi.double()), _leaf(ki.double())
    mask = selection_mask(idx, cu, k.shape[0], block)
    want = brute_kl(q, k, lse, qi2, ki2, mask, reduction=reduction)
    want.backward()
    assert want > 0
    assert_close(kl, want, "kl", atol=1e-6, rtol=1e-5)
    assert_close(qi.grad, qi2.grad, "dq_idx", atol=1e-6, rtol=1e-4)
    assert_close(ki.grad, ki2.grad, "dk_idx", atol=1e-6, rtol=1e-4)


def test_indexer_kl_mean_is_sum_over_tokens_and_groups():
    g, q, k, qi, ki = _kl_inputs([19, 8], 4, 2, 8, 4, seed=21)
    cu = cu_seqlens_of([19, 8])
    idx = mk.select_blocks(qi, ki, cu, 4, 2)
    _, lse = mk.sparse_attention(q, k, _randn(*k.shape, gen=g), idx, cu, 4)
    kl_sum = mk.indexer_kl(q, k, lse, qi, ki, idx, cu, 4, reduction="sum")
    kl_mean = mk.indexer_kl(q, k, lse, qi, ki, idx, cu, 4)
    assert_close(kl_mean * 27 * 2, kl_sum, "mean * T * Hkv", atol=1e-5, rtol=1e-6)


def test_indexer_kl_large_logits_chunked(monkeypatch):
    monkeypatch.setattr(mk_layout, "REFERENCE_CHUNK_ELEMENTS", 150)
    g, q, k, qi, ki = _kl_inputs([26, 7], 8, 2, 8, 8, seed=4, scale=4.0)
    with torch.no_grad():
        qi.mul_(5.0)
    cu = cu_seqlens_of([26, 7])
    idx = mk.select_blocks(qi, ki, cu, 4, 3)
    _, lse = mk.sparse_attention(q, k, _randn(*k.shape, gen=g), idx, cu, 4)
    kl = mk.indexer_kl(q, k, lse, qi, ki, idx, cu, 4)
    kl.backward()
    qi2, ki2 = _leaf(qi.double()), _leaf(ki.double())
    want = brute_kl(q, k, lse, qi2, ki2, selection_mask(idx, cu, 33, 4))
    want.backward()
    assert_close(kl, want, "kl", atol=1e-5, rtol=1e-5)
    assert_close(qi.grad, qi2.grad, "dq_idx", atol=1e-5, rtol=1e-4)
    assert_close(ki.grad, ki2.grad, "dk_idx", atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("lens, hq, hkv, d, di", [([13, 3, 22], 8, 2, 8, 4), ([20, 9], 6, 3, 4, 8)])
@pytest.mark.parametrize("pass_lse", [False, True])
def test_indexer_kl_dense_matches_brute_force(lens, hq, hkv, d, di, pass_lse):
    _, q, k, qi, ki = _kl_inputs(lens, hq, hkv, d, di, seed=sum(lens) + 50)
    cu = cu_seqlens_of(lens)
    q, k = _leaf(q), _leaf(k)
    lse = None
    if pass_lse:
        mask = visible_mask(cu, k.shape[0])[None].expand(hkv, -1, -1)
        lse = brute_attention(q.detach(), k.detach(), k.detach(), mask)[1].float()
    with poison_allocations():
        kl = mk.indexer_kl_dense(q, k, qi, ki, cu, lse=lse)
        kl.backward()
    assert q.grad is None and k.grad is None
    qi2, ki2 = _leaf(qi.double()), _leaf(ki.double())
    want = brute_kl_dense(q, k, qi2, ki2, cu)
    want.backward()
    assert_close(kl, want, "dense kl", atol=1e-6, rtol=1e-5)
    assert_close(qi.grad, qi2.grad, "dq_idx", atol=1e-6, rtol=1e-4)
    assert_close(ki.grad, ki2.grad, "dk_idx", atol=1e-6, rtol=1e-4)


def test_indexer_kl_is_zero_when_student_matches_teacher():
    # One head per group and q_idx/k_idx = q/k with matching scales: P == Q on any support.
    g = _gen(31)
    cu = cu_seqlens_of([18, 7])
    q, k = _randn(25, 2, 8, gen=g), _randn(25, 2, 8, gen=g)
    k_shared = k[:, :1].expand(25, 2, 8).contiguous()  # both groups share one key head like k_idx
    idx = mk.select_blocks(q, k_shared[:, 0], cu, 4, 2, index_scale=8 ** -0.5)
    _, lse = mk.sparse_attention(q, k_shared, k_shared, idx, cu, 4)
    kl = mk.indexer_kl(q, k_shared, lse, q, k_shared[:, 0], idx, cu, 4)
    dense = mk.indexer_kl_dense(q, k_shared, q, k_shared[:, 0], cu)
    assert abs(kl.item()) < 1e-6 and abs(dense.item()) < 1e-6


# ----------------------------------------------------------------------------- context parallel
def test_context_parallel_zigzag_equals_full_sequence():
    """Two ranks (zigzag chunks, all keys) reproduce the full-sequence values and gradients."""
    lens, cp, block, topk = [24, 16], 2, 4, 3
    hq, hkv, d, di = 4, 2, 8, 4
    g = _gen(77)
    t = sum(lens)
    cu = cu_seqlens_of(lens)
    q, k, v = _randn(t, hq, d, gen=g), _randn(t, hkv, d, gen=g), _randn(t, hkv, d, gen=g)
    qi, ki = _randn(t, hkv, di, gen=g), _randn(t, di, gen=g)
    do = _randn(t, hq, d, gen=g)

    def run(rows, cu_, ks, kl):
        qq, kk, vv, qqi, kki = (_leaf(x) for x in (q[rows], k, v, qi[rows], ki))
        cpa = dict(key_starts=ks, key_lens=kl)
        idx = mk.select_blocks(qqi, kki, cu_, block, topk, **cpa)
        out, lse = mk.sparse_attention(qq, kk, vv, idx, cu_, block, **cpa)
        (out * do[rows]).sum().backward()
        kl_s = mk.indexer_kl(qq, kk, lse, qqi, kki, idx, cu_, block, reduction="sum", **cpa)
        kl_d = mk.indexer_kl_dense(qq, kk, qqi, kki, cu_, reduction="sum", **cpa)
        (kl_s + 0.5 * kl_d).backward()
        return dict(idx=idx, out=out, lse=lse, kl=kl_s, kld=kl_d, dq=qq.grad, dk=kk.grad, dv=vv.grad,
                    dqi=qqi.grad, dki=kki.grad)

    full = run(torch.arange(t), cu, None, None)
    ranks = [zigzag_rank(lens, cp, r) for r in range(cp)]
    parts = [run(*rk) for rk in ranks]
    for (rows, *_), part in zip(ranks, parts):
        assert torch.equal(part["idx"], full["idx"][:, rows])
        for key in ("out", "lse", "dq", "dqi"):
            assert_close(part[key], full[key][rows], f"cp {key}", atol=1e-5, rtol=1e-5)
    for key in ("kl", "kld", "dk", "dv", "dki"):
        assert_close(sum(p[key] for p in parts), full[key], f"cp {key} (sum over ranks)", atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- assert_same_selection
def test_assert_same_selection_accepts_near_ties_only():
    a = torch.tensor([[[3, 1, 5], [2, 0, -1]]], dtype=torch.int32)  # [1, 2, 3]
    scores = torch.tensor([[[0.0, 1.0, 0.0, 2.0, 2.0005, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0, 0.0]]])
    reordered = torch.tensor([[[1, 3, 5], [2, 0, -1]]], dtype=torch.int32)
    assert_same_selection(a, reordered, scores)  # same sets, other order, local kept last
    near = torch.tensor([[[4, 1, 5], [2, 0, -1]]], dtype=torch.int32)  # 3 -> 4 is a near-tie
    assert_same_selection(a, near, scores, atol=1e-3)
    with pytest.raises(AssertionError, match="beyond near-ties"):
        assert_same_selection(a, near, scores, atol=1e-5, rtol=0.0)
    far = torch.tensor([[[2, 1, 5], [2, 0, -1]]], dtype=torch.int32)  # 3 -> 2: score gap 2
    with pytest.raises(AssertionError, match="beyond near-ties"):
        assert_same_selection(a, far, scores)
    with pytest.raises(AssertionError, match="local"):
        assert_same_selection(a, torch.tensor([[[3, 5, 1], [2, 0, -1]]], dtype=torch.int32), scores)
    with pytest.raises(AssertionError, match="valid counts"):
        assert_same_selection(a, torch.tensor([[[3, 1, 5], [2, -1, -1]]], dtype=torch.int32), scores)


# ----------------------------------------------------------------------------- degenerate layouts
def test_empty_fragments_and_empty_batch():
    g = _gen(13)
    for lens in ([0, 9, 0, 3], [0]):
        t = sum(lens)
        cu = cu_seqlens_of(lens)
        q, k, v = _randn(t, 4, 8, gen=g, grad=True), _randn(t, 2, 8, gen=g, grad=True), _randn(t, 2, 8, gen=g, grad=True)
        qi, ki = _randn(t, 2, 4, gen=g, grad=True), _randn(t, 4, gen=g, grad=True)
        with poison_allocations():
            idx = mk.select_blocks(qi, ki, cu, 4, 2)
            out, lse = mk.sparse_attention(q, k, v, idx, cu, 4)
            kl = mk.indexer_kl(q, k, lse, qi, ki, idx, cu, 4) + mk.indexer_kl_dense(q, k, qi, ki, cu)
            (out.sum() + kl).backward()
        assert idx.shape == (2, t, 2) and torch.equal(idx, brute_select(qi, ki, cu, 4, 2))
        assert torch.isfinite(out).all() and torch.isfinite(lse).all() and torch.isfinite(kl)
        for x in (q, k, v, qi, ki):
            assert x.grad is not None and torch.isfinite(x.grad).all()


def test_keys_outside_every_fragment_get_zero_gradient():
    # CP-style layout whose key range covers only part of k: the other rows must get exact zeros.
    g = _gen(17)
    cu = cu_seqlens_of([4])
    ks, kl = torch.tensor([3], dtype=torch.int32), torch.tensor([10], dtype=torch.int32)
    q, k, v = _randn(4, 2, 8, gen=g, grad=True), _randn(16, 1, 8, gen=g, grad=True), _randn(16, 1, 8, gen=g, grad=True)
    qi, ki = _randn(4, 1, 4, gen=g, grad=True), _randn(16, 4, gen=g, grad=True)
    idx = mk.select_blocks(qi, ki, cu, 4, 2, key_starts=ks, key_lens=kl)
    assert torch.equal(idx, brute_select(qi, ki, cu, 4, 2, key_starts=ks, key_lens=kl))
    out, lse = mk.sparse_attention(q, k, v, idx, cu, 4, key_starts=ks, key_lens=kl)
    kl_val = mk.indexer_kl(q, k, lse, qi, ki, idx, cu, 4, key_starts=ks, key_lens=kl)
    (out.sum() + kl_val).backward()
    outside = torch.ones(16, dtype=torch.bool)
    outside[3:13] = False
    for name, grad in (("dk", k.grad), ("dv", v.grad), ("dk_idx", ki.grad)):
        assert torch.all(grad[outside] == 0), name
        assert grad[~outside].abs().sum() > 0, name


# ----------------------------------------------------------------------------- GPU (device tool)
def _all_ops(q, k, v, qi, ki, cu, block, topk):
    """Values and gradients of the four ops on one device (reference backend)."""
    q, k, v, qi, ki = (_leaf(x) for x in (q, k, v, qi, ki))
    idx = mk.select_blocks(qi, ki, cu, block, topk)
    out, lse = mk.sparse_attention(q, k, v, idx, cu, block)
    kl = mk.indexer_kl(q, k, lse, qi, ki, idx, cu, block)
    kld = mk.indexer_kl_dense(q, k, qi, ki, cu)
    (out.float().square().mean() + kl + kld).backward()
    return dict(idx=idx, out=out, lse=lse, kl=kl, kld=kld, dq=q.grad, dk=k.grad, dv=v.grad, dqi=qi.grad,
                dki=ki.grad)


@pytest.mark.gpu
def test_reference_on_cuda_matches_cpu():
    g = _gen(41)
    lens = [300, 77, 513]
    t = sum(lens)
    inputs = (_randn(t, 8, 64, gen=g), _randn(t, 2, 64, gen=g), _randn(t, 2, 64, gen=g),
              _randn(t, 2, 32, gen=g), _randn(t, 32, gen=g))
    cpu = _all_ops(*inputs, cu_seqlens_of(lens), 64, 4)
    with poison_allocations():
        gpu = _all_ops(*(x.cuda() for x in inputs), cu_seqlens_of(lens, "cuda"), 64, 4)
    assert_same_selection(gpu["idx"], cpu["idx"], block_scores_ref(
        inputs[3], inputs[4], mk.make_layout(cu_seqlens_of(lens), total_keys=t), block_size=64,
        index_scale=32 ** -0.5), atol=1e-4, rtol=1e-5)
    for key in ("out", "lse", "kl", "kld", "dq", "dk", "dv", "dqi", "dki"):
        assert_close(gpu[key], cpu[key], f"cuda vs cpu {key}", atol=2e-5, rtol=1e-4)


@pytest.mark.gpu
def test_reference_on_cuda_long_sequence_bounded_memory():
    """The oracle at a real size (8K tokens, 64/8 heads, d=128, bf16): finite and O(T x chunk) memory."""
    import time

    g = torch.Generator(device="cuda").manual_seed(3)
    t, hq, hkv, d, block, topk = 8192, 64, 8, 128, 128, 16
    cu = cu_seqlens_of([t], "cuda")

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_(True)

    q, k, v, qi, ki = rnd(t, hq, d), rnd(t, hkv, d), rnd(t, hkv, d), rnd(t, hkv, d), rnd(t, d)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    idx = mk.select_blocks(qi, ki, cu, block, topk)
    out, lse = mk.sparse_attention(q, k, v, idx, cu, block)
    kl = mk.indexer_kl(q, k, lse, qi, ki, idx, cu, block)
    kld = mk.indexer_kl_dense(q, k, qi, ki, cu)
    (out.float().square().mean() + kl + kld).backward()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    print(f"reference 8K 64/8 d128 all ops fwd+bwd: {time.perf_counter() - t0:.2f} s, peak +{peak:.2f} GiB")
    for x in (out, lse, kl, kld, q.grad, k.grad, v.grad, qi.grad, ki.grad):
        assert torch.isfinite(x.float()).all()
    own = torch.arange(t, device="cuda") // block  # [T] each query's own block
    kept = (idx >= 0).sum(-1)  # [Hkv, T] valid slots; the rest is -1 padding
    assert (kept == (own + 1).clamp(max=topk)[None]).all(), "a query keeps min(causal blocks, topk) blocks"
    last = idx.gather(-1, (kept - 1).long()[..., None])[..., 0]  # [Hkv, T]
    assert (last == own[None]).all(), "the own block must sit in the last valid slot"
    assert (idx <= own[None, :, None]).all(), "a query selected a future block"
    assert peak < 8.0, f"reference used {peak:.2f} GiB extra: chunking is not bounding memory"


def test_forced_triton_backend_passes_the_layout_and_options(monkeypatch):
    """Dispatch contract with a stand-in kernel module (the real ones are tested in their own files)."""
    import sys
    import types

    calls = {}

    def fake_select(q_idx, k_idx, layout, **opts):
        calls["select"] = (layout, opts)
        return torch.zeros(q_idx.shape[1], q_idx.shape[0], opts["topk"], dtype=torch.int32)

    fake = types.ModuleType("msa_kernels.select.triton")
    fake.select_blocks_triton = fake_select
    monkeypatch.setitem(sys.modules, "msa_kernels.select.triton", fake)
    monkeypatch.setenv("MSA_KERNELS_BACKEND", "triton")
    g = _gen(2)
    qi, ki = _randn(10, 2, 4, gen=g), _randn(10, 4, gen=g)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        mk.select_blocks(qi, ki, cu_seqlens_of([6, 4]), 4, 3)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mk.select_blocks(qi, ki, cu_seqlens_of([6, 4]), 4, 3, local_window=1)
    layout, opts = calls["select"]
    assert isinstance(layout, mk.VarlenLayout) and layout.total_q == 10 and layout.is_self
    assert opts == dict(block_size=4, topk=3, index_scale=0.5, force_sink=False, local_window=1)


def test_future_block_ids_are_ignored_in_chunks(monkeypatch):
    # Ids of blocks after the query's local block are legal but contribute nothing; each chunk sees
    # only keys up to its last position, so such ids exceed the chunk's block count.
    monkeypatch.setattr(mk_layout, "REFERENCE_CHUNK_ELEMENTS", 100)
    g = _gen(23)
    lens = [19, 14]
    cu = cu_seqlens_of(lens)
    q, k, v = _randn(33, 4, 8, gen=g), _randn(33, 2, 8, gen=g), _randn(33, 2, 8, gen=g)
    idx = torch.full((2, 33, 6), -1, dtype=torch.int32)
    idx[:, :19, :5] = torch.arange(5, dtype=torch.int32)  # every block of sequence 0, ...
    idx[:, 19:, :4] = torch.tensor([3, 1, 0, 2], dtype=torch.int32)  # ... and of sequence 1
    _check_attention(q, k, v, idx, cu, 4, g=g)
    qi, ki = _randn(33, 2, 4, gen=g, grad=True), _randn(33, 4, gen=g, grad=True)
    _, lse = mk.sparse_attention(q, k, v, idx, cu, 4)
    kl = mk.indexer_kl(q, k, lse, qi, ki, idx, cu, 4)
    kl.backward()
    qi2, ki2 = _leaf(qi.double()), _leaf(ki.double())
    want = brute_kl(q, k, lse, qi2, ki2, selection_mask(idx, cu, 33, 4))
    want.backward()
    assert_close(kl, want, "kl", atol=1e-6, rtol=1e-5)
    assert_close(qi.grad, qi2.grad, "dq_idx", atol=1e-6, rtol=1e-4)
    assert_close(ki.grad, ki2.grad, "dk_idx", atol=1e-6, rtol=1e-4)
