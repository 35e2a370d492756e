"""The KL the model trains with and the KL it reports are the spec's, in a whole GPT model.

Tiny MSA-MoE GPTModel (2 of 3 layers MSA), parameters large enough that attention is far from
uniform. Each MSA layer's q, k (after RoPE) and index input are captured during the forward; an
independent float64 oracle (kl_oracle.py, written from docs/MSA.md) then recomputes:
  * the per-layer KL that kl_tracker reports (dense = full causal support, sparse = the selected
    blocks), and
  * the gradient the backward delivers to every W_qi / W_ki:
    d/dW [lambda * loss_scale * sum over MSA layers of KL_l], exactly, while every other
    parameter's gradient is untouched by the KL.
"""

import pytest
import torch

from . import kl_oracle

S, B = 32, 2  # 4 blocks of 8 tokens per sequence
BLOCK, TOPK, DI = 8, 2, 8


def build(kl_coeff: float, moe: bool = True, **attention):
    """A 3-layer model (layer 1 full attention, layers 2-3 MSA) with fixed parameters."""
    from msa_train.model import (
        AttentionConfig,
        ModelConfig,
        build_model,
        build_transformer_config,
    )
    from msa_train.model.parity import fill_parameters

    experts = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                   moe_first_k_dense=1) if moe else {}
    model_cfg = ModelConfig(
        name="acct", num_layers=3, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
        num_query_groups=2, kv_channels=8, vocab_size=64, rotary_percent=0.5, **experts)
    attn_cfg = AttentionConfig(block_size=BLOCK, topk=TOPK, index_dim=DI, dense_first_layers=1,
                               kl_coeff=kl_coeff, **attention)
    cfg = build_transformer_config(model_cfg, attn_cfg, {})
    model = build_model(cfg, vocab_size=64, max_seq_len=S)
    fill_parameters(model, cfg, std=0.3)  # peaked attention: KL values O(0.1-1), not ~0
    model.train()
    return model


def msa_cores(model):
    from msa_train.model import MSACoreAttention

    cores = [m for m in model.modules() if isinstance(m, MSACoreAttention) and m.is_msa]
    assert [c.layer_number for c in cores] == [2, 3]
    return cores


def forward_capturing(model, tokens):
    """LM loss (mean) of one forward; per MSA layer the tensors its _msa_forward received."""
    captured = {}
    for core in msa_cores(model):
        original = core._msa_forward

        def wrapped(q, k, v, x, layout, _core=core, _orig=original):
            captured[_core.layer_number] = {"q": q.detach().clone(), "k": k.detach().clone(),
                                                "x": x.detach().clone(), "core": _core}
            return _orig(q, k, v, x, layout)

        core._msa_forward = wrapped
    try:
        loss = model(tokens, None, None, labels=tokens).float().mean()
    finally:
        for core in msa_cores(model):
            del core._msa_forward
    return loss, captured


def oracle_kl(cap, mode: str, w_qi=None, w_ki=None):
    """Float64 KL of one layer from captured tensors; differentiable in (w_qi, w_ki)."""
    import msa_kernels

    core = cap["core"]
    hkv = cap["k"].shape[1]
    w_qi = core.indexer.linear_qi.weight.detach() if w_qi is None else w_qi
    w_ki = core.indexer.weight_ki.detach() if w_ki is None else w_ki
    q_idx, k_idx = kl_oracle.index_projections(cap["x"], w_qi, w_ki, hkv)
    topk = None
    if mode == "sparse":  # the selection the layer made (select_blocks is deterministic)
        cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32)
        topk = msa_kernels.select_blocks(q_idx.float(), k_idx.float(), cu, BLOCK, TOPK)
    mask = kl_oracle.support_mask([S] * B, hkv, topk, BLOCK)
    return kl_oracle.indexer_kl(cap["q"], cap["k"], q_idx, k_idx, mask, core.softmax_scale,
                                DI ** -0.5)


def tokens_batch():
    gen = torch.Generator().manual_seed(5)
    return torch.randint(0, 64, (B, S), generator=gen)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_tracker_kl_equals_independent_recomputation(megatron_1rank, mode):
    from msa_train.model import kl_tracker, set_kl_loss_scale, set_msa_mode

    model = build(kl_coeff=1.0)
    set_msa_mode(model, mode)
    set_kl_loss_scale(1.0)
    _, captured = forward_capturing(model, tokens_batch())
    reported = kl_tracker.get_kl_metrics(reset=True)
    assert sorted(reported) == [2, 3]
    for layer, cap in captured.items():
        expected = float(oracle_kl(cap, mode))
        assert expected > 0.05, f"layer {layer}: KL {expected} too small to compare meaningfully"
        assert reported[layer] == pytest.approx(expected, rel=2e-5), (mode, layer)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_index_gradients_are_lambda_times_sum_of_layer_kls(megatron_1rank, mode):
    from msa_train.model import set_kl_loss_scale, set_msa_mode

    lam, loss_scale = 0.37, 0.5  # loss_scale: e.g. 1 / num_microbatches
    tokens = tokens_batch()
    grads, caps = {}, {}
    for coeff in (0.0, lam):
        model = build(kl_coeff=coeff)  # same parameters both times (fill_parameters)
        set_msa_mode(model, mode)
        set_kl_loss_scale(loss_scale)
        model.zero_grad(set_to_none=True)
        loss, caps[coeff] = forward_capturing(model, tokens)
        loss.backward()
        grads[coeff] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # Backbone: identical gradients with and without the KL (sg(X), detached teacher).
    index_names = {n for n in grads[lam] if ".indexer." in n}
    assert len(index_names) == 4  # W_qi and W_ki of both MSA layers
    for name, g in grads[lam].items():
        if name not in index_names:
            torch.testing.assert_close(g, grads[0.0][name], rtol=0, atol=0, msg=name)

    # Index branch: exactly lambda * loss_scale * d(sum_l KL_l)/dW (each W sees its own layer).
    params = []
    total = 0.0
    for layer, cap in caps[lam].items():
        w_qi = cap["core"].indexer.linear_qi.weight.detach().double().requires_grad_()
        w_ki = cap["core"].indexer.weight_ki.detach().double().requires_grad_()
        total = total + oracle_kl(cap, mode, w_qi, w_ki)
        params.append((layer, w_qi, w_ki))
    total.backward()
    for layer, w_qi, w_ki in params:
        prefix = f"decoder.layers.{layer - 1}.self_attention.core_attention.indexer."
        for name, ref in ((prefix + "linear_qi.weight", w_qi.grad), (prefix + "weight_ki", w_ki.grad)):
            got = grads[lam][name].double()
            torch.testing.assert_close(got, lam * loss_scale * ref, rtol=1e-4, atol=1e-7, msg=name)
            assert ref.abs().max() > 1e-3  # non-vacuous
