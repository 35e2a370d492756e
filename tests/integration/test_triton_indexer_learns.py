"""GPU: the indexer learns through the Triton kernels (the ops sparse training runs on Hopper) in
bf16, at a shape closer to real use than the CPU tests (block 64, Di = 128, 2 x 1024 tokens).

W_qi / W_ki (fp32 master weights, bf16 activations as under bf16 training) are trained alone with
Adam against a fixed, peaked teacher that an index branch with Di = Hkv * D represents exactly.
"""

import math

import pytest
import torch

pytestmark = pytest.mark.gpu

SEQ, N_SEQ, HIDDEN, HQ, HKV, D, BLOCK, TOPK = 1024, 2, 128, 8, 2, 64, 64, 4
DI = HKV * D


def _teacher(gen, alpha: float):
    dev = "cuda"
    x = torch.randn(N_SEQ * SEQ, HIDDEN, generator=gen, device=dev)  # [T, h]
    wq = torch.randn(HIDDEN, HKV * D, generator=gen, device=dev) / math.sqrt(HIDDEN)
    wk = torch.randn(HIDDEN, HKV * D, generator=gen, device=dev) / math.sqrt(HIDDEN)
    q = (x @ wq).view(-1, HKV, D).repeat_interleave(HQ // HKV, dim=1) * alpha  # [T, Hq, D]
    k = (x @ wk).view(-1, HKV, D)  # [T, Hkv, D]
    v = torch.randn(k.shape, generator=gen, device=dev)
    return x, q.bfloat16(), k.bfloat16(), v.bfloat16()


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_triton_kl_trains_the_indexer_in_bf16(mode, monkeypatch):
    import msa_kernels

    monkeypatch.setenv("MSA_KERNELS_BACKEND", "triton")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, q, k, v = _teacher(gen, alpha=2.0)
    cu = torch.arange(0, (N_SEQ + 1) * SEQ, SEQ, dtype=torch.int32, device="cuda")
    w_qi = (torch.randn(HKV * DI, HIDDEN, generator=gen, device="cuda") * 0.02).requires_grad_()
    w_ki = (torch.randn(DI, HIDDEN, generator=gen, device="cuda") * 0.02).requires_grad_()
    opt = torch.optim.Adam([w_qi, w_ki], lr=1e-2)
    xb = x.bfloat16()
    curve = []
    for _ in range(301):
        q_idx = (xb @ w_qi.t().bfloat16()).view(-1, HKV, DI)  # [T, Hkv, Di] bf16
        k_idx = xb @ w_ki.t().bfloat16()  # [T, Di]
        if mode == "dense":
            kl = msa_kernels.indexer_kl_dense(q, k, q_idx, k_idx, cu)
        else:
            with torch.no_grad():
                sel = msa_kernels.select_blocks(q_idx, k_idx, cu, BLOCK, TOPK)
                _, lse = msa_kernels.sparse_attention(q, k, v, sel, cu, BLOCK)
            kl = msa_kernels.indexer_kl(q, k, lse, q_idx, k_idx, sel, cu, BLOCK)
        curve.append(float(kl.detach()))
        opt.zero_grad(set_to_none=True)
        kl.backward()
        assert w_qi.grad is not None and torch.isfinite(w_qi.grad).all()
        opt.step()
    print(f"{mode}: KL {curve[0]:.4g} -> {curve[100]:.4g} (100) -> {curve[-1]:.4g} (300)")
    assert curve[0] > 0.5, f"teacher not peaked enough (KL at init {curve[0]:.3g})"
    assert curve[-1] < curve[0] / 20, f"{mode}: KL {curve[0]:.4g} -> {curve[-1]:.4g} in 300 steps"
