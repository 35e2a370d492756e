"""Triton select_blocks against the exact reference (and the brute-force spec formula).

CPU: the kernel runs under TRITON_INTERPRET=1 at tiny sizes with fp32 inputs, where the selection must
match the reference EXACTLY, slot order included (forced blocks, ranked blocks by score desc / id asc,
local block, -1). GPU (@pytest.mark.gpu): 8K-32K tokens, 4 and 8 index heads, Di = 128, block 128,
top-16, bf16 inputs vs the float32 reference, compared as sets up to near-ties. Outputs come from
NaN/garbage-poisoned allocations, inputs are fresh random draws.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import msa_kernels  # noqa: E402
from msa_kernels.layout import make_layout  # noqa: E402
from msa_kernels.select import naive  # noqa: E402
from msa_kernels.select import triton as sel_triton  # noqa: E402

from .reference_utils import (assert_same_selection, brute_select, cu_seqlens_of,  # noqa: E402
                              poison_allocations, zigzag_rank)

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _inputs(lens, hkv, di, dtype=torch.float32, scale=1.0, seed=None, device=DEV):
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ())))
    t = sum(lens)
    q_idx = (torch.randn(t, hkv, di, generator=gen) * scale).to(dtype).to(device)
    k_idx = (torch.randn(t, di, generator=gen) * scale).to(dtype).to(device)
    cu = cu_seqlens_of(lens, device)
    return q_idx, k_idx, cu


def _run_both(q_idx, k_idx, cu, bs, topk, key_starts=None, key_lens=None, **opts):
    lay = make_layout(cu, key_starts, key_lens, total_keys=k_idx.shape[0], total_queries=q_idx.shape[0])
    scale = q_idx.shape[-1] ** -0.5
    with poison_allocations():
        got = sel_triton.select_blocks_triton(q_idx, k_idx, lay, block_size=bs, topk=topk, index_scale=scale,
                                              force_sink=opts.get("force_sink", False),
                                              local_window=opts.get("local_window", 0))
    ref = naive.select_blocks_ref(q_idx.float(), k_idx.float(), lay, block_size=bs, topk=topk, index_scale=scale,
                                  force_sink=opts.get("force_sink", False),
                                  local_window=opts.get("local_window", 0))
    return got, ref


CASES = [
    # lens, hkv, di, block, topk
    ([37, 130, 5], 2, 32, 16, 4),  # packed, lengths not multiples of the block, a sequence < 1 block
    ([70, 1, 90], 1, 16, 16, 1),  # topk = 1 (local only), a 1-token sequence
    ([150], 3, 32, 32, 3),
    ([129, 40], 2, 32, 16, 32),  # topk wider than the visible blocks
    ([100], 2, 24, 24, 5),  # non power-of-two block and head dim (padded tiles)
    ([8, 9, 10], 4, 16, 16, 2),  # every sequence shorter than one block
]


@pytest.mark.parametrize("lens,hkv,di,bs,topk", CASES)
def test_select_matches_reference_exactly(lens, hkv, di, bs, topk):
    q_idx, k_idx, cu = _inputs(lens, hkv, di)
    got, ref = _run_both(q_idx, k_idx, cu, bs, topk)
    assert got.dtype == torch.int32 and got.shape == (hkv, sum(lens), topk)
    assert torch.equal(got.cpu(), ref.cpu())
    assert torch.equal(got.cpu(), brute_select(q_idx, k_idx, cu.cpu(), bs, topk))


@pytest.mark.parametrize("force_sink,local_window,topk", [(True, 0, 4), (False, 2, 5), (True, 3, 3),
                                                          (True, 1, 6)])
def test_select_forced_blocks(force_sink, local_window, topk):
    q_idx, k_idx, cu = _inputs([200, 75], 2, 16)
    got, ref = _run_both(q_idx, k_idx, cu, 16, topk, force_sink=force_sink, local_window=local_window)
    assert torch.equal(got.cpu(), ref.cpu())
    brute = brute_select(q_idx, k_idx, cu.cpu(), 16, topk, force_sink=force_sink, local_window=local_window)
    assert torch.equal(got.cpu(), brute)


def test_select_ties_prefer_lower_block_id():
    # Blocks 1..4 are copies of block 0's keys: their block maxima tie exactly for every query.
    q_idx, k_idx, cu = _inputs([112], 2, 16)
    k_idx[16:80] = k_idx[:16].repeat(4, 1)
    got, ref = _run_both(q_idx, k_idx, cu, 16, 3)
    assert torch.equal(got.cpu(), ref.cpu())


def test_select_large_logits():
    # Logits >= 30 (no exp anywhere in the ranking: nothing may overflow).
    q_idx, k_idx, cu = _inputs([96, 50], 2, 16, scale=12.0)
    got, ref = _run_both(q_idx, k_idx, cu, 16, 4)
    assert torch.equal(got.cpu(), ref.cpu())


def test_select_context_parallel_zigzag_matches_full_sequence():
    lens, cp, bs, topk = [128, 64], 2, 16, 4
    q_idx, k_idx, cu_full = _inputs(lens, 2, 16)
    full, _ = _run_both(q_idx, k_idx, cu_full, bs, topk)
    for rank in range(cp):
        rows, cu, ks, kl = zigzag_rank(lens, cp, rank)
        cu, ks, kl = cu.to(DEV), ks.to(DEV), kl.to(DEV)
        got, ref = _run_both(q_idx[rows.to(DEV)], k_idx, cu, bs, topk, key_starts=ks, key_lens=kl)
        assert torch.equal(got.cpu(), ref.cpu())
        assert torch.equal(got.cpu(), full[:, rows.to(DEV)].cpu())


def test_select_half_precision_near_ties():
    q_idx, k_idx, cu = _inputs([90, 41], 2, 32, dtype=torch.float16)
    got, ref = _run_both(q_idx, k_idx, cu, 16, 4)
    lay = make_layout(cu, total_keys=k_idx.shape[0], total_queries=q_idx.shape[0])
    scores = naive.block_scores_ref(q_idx.float(), k_idx.float(), lay, block_size=16, index_scale=32 ** -0.5)
    assert_same_selection(got, ref, scores.cpu(), atol=1e-3, rtol=1e-3)


def test_select_public_api_dispatch(monkeypatch):
    monkeypatch.setenv("MSA_KERNELS_BACKEND", "triton")
    q_idx, k_idx, cu = _inputs([50, 33], 2, 16)
    got = msa_kernels.select_blocks(q_idx, k_idx, cu, block_size=16, topk=3)
    monkeypatch.setenv("MSA_KERNELS_BACKEND", "reference")
    ref = msa_kernels.select_blocks(q_idx, k_idx, cu, block_size=16, topk=3)
    assert torch.equal(got.cpu(), ref.cpu())


def test_select_rejects_mixed_dtypes():
    q_idx, k_idx, cu = _inputs([40], 1, 16)
    lay = make_layout(cu, total_keys=40, total_queries=40)
    with pytest.raises(TypeError, match="k_idx dtype"):
        sel_triton.select_blocks_triton(q_idx, k_idx.double(), lay, block_size=16, topk=2, index_scale=0.25)


# ------------------------------------------------------------------------------------------------
# GPU: real sizes, bf16 inputs vs the float32 reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("t,hkv", [(8192, 4), (8192, 8), (32768, 8)])
def test_select_gpu_parity(t, hkv, monkeypatch):
    import msa_kernels.layout as layout_mod
    monkeypatch.setattr(layout_mod, "REFERENCE_CHUNK_ELEMENTS", 1 << 27)
    lens = [t - 1000 - 77, 1000, 77]
    q_idx, k_idx, cu = _inputs(lens, hkv, 128, dtype=torch.bfloat16, device="cuda")
    got, ref = _run_both(q_idx, k_idx, cu, 128, 16)
    lay = make_layout(cu, total_keys=t, total_queries=t)
    scores = naive.block_scores_ref(q_idx.float(), k_idx.float(), lay, block_size=128, index_scale=128 ** -0.5)
    assert_same_selection(got, ref, scores.cpu(), atol=1e-3, rtol=1e-4)
