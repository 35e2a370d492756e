"""The speed switches give the same model: grouped-GEMM experts (model.moe_grouped_gemm) against
Megatron's SequentialMLP, and the chunked output loss (model.lm_loss=chunked) against Megatron's
materialised logits; forward and every gradient, fp32 on CPU. The CUDA-only paths (liger's fused
loss, the bf16 grouped GEMM, Megatron's compiled SwiGLU) are checked in tests/model/test_gpu_speed_paths.py."""

import pytest
import torch

from tests.model.conftest import tiny_cfgs

S, B = 24, 2


def _build(megatron_seed: int, **model_overrides):
    from msa_train.model import build_model, build_transformer_config
    from msa_train.model.parity import fill_parameters

    model_cfg, attn_cfg = tiny_cfgs(moe=True)
    for k, v in model_overrides.items():
        setattr(model_cfg, k, v)
    cfg = build_transformer_config(model_cfg, attn_cfg, {})
    torch.manual_seed(megatron_seed)
    model = build_model(cfg, max_seq_len=S)
    fill_parameters(model, cfg)
    return model, model_cfg


def _twin(ref, **model_overrides):
    twin, _ = _build(0, **model_overrides)
    twin.load_state_dict(ref.state_dict())
    return twin


def _loss_and_grads(model, tokens, labels):
    model.zero_grad(set_to_none=True)
    per_token = model(tokens, None, None, labels=labels)
    weights = torch.linspace(0.5, 1.5, per_token.numel()).view_as(per_token)  # non-uniform
    (per_token.float() * weights).sum().backward()
    return per_token.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                if p.grad is not None}


def _compare(model_a, model_b, seed: int, atol: float):
    g = torch.Generator().manual_seed(seed)
    vocab = model_a.config.gpt_vocab_size
    tokens = torch.randint(0, vocab, (B, S), generator=g)
    labels = torch.randint(0, vocab, (B, S), generator=g)
    loss_a, grads_a = _loss_and_grads(model_a, tokens, labels)
    loss_b, grads_b = _loss_and_grads(model_b, tokens, labels)
    assert loss_a.shape == (B, S) and loss_b.dtype == torch.float32
    torch.testing.assert_close(loss_b, loss_a, atol=atol, rtol=1e-5)
    assert sorted(grads_a) == sorted(grads_b)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=atol, rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_grouped_experts_equal_sequential_mlp(megatron_1rank):
    from msa_train.model.experts import GroupedExperts

    ref, _ = _build(7)
    fast = _twin(ref)
    for module in fast.modules():  # same parameters, grouped forward
        if type(module).__name__ == "SequentialMLP":
            module.__class__ = GroupedExperts
            module._gated, module._has_bias, module._fused_activation = True, False, False
    assert any(isinstance(m, GroupedExperts) for m in fast.modules())
    _compare(ref, fast, seed=11, atol=1e-5)


def test_grouped_experts_built_by_the_switch_keep_the_parameter_names(megatron_1rank):
    from msa_train.model.experts import GroupedExperts

    ref, _ = _build(7)
    fast, _ = _build(7, moe_grouped_gemm=True)
    assert any(isinstance(m, GroupedExperts) for m in fast.modules())
    assert not any(isinstance(m, GroupedExperts) for m in ref.modules())
    assert list(ref.state_dict()) == list(fast.state_dict())
    fast.load_state_dict(ref.state_dict())
    _compare(ref, fast, seed=12, atol=1e-5)


def test_grouped_experts_with_the_clamped_swiglu(megatron_1rank):
    # MiniMax-M3's swigluoai (quick-GELU gate, clamp, up + 1) on the grouped path.
    ref, _ = _build(8, activation="swigluoai", activation_clamp=0.05)
    fast = _twin(ref, activation="swigluoai", activation_clamp=0.05, moe_grouped_gemm=True)
    _compare(ref, fast, seed=15, atol=1e-5)


def test_grouped_experts_with_an_expert_that_gets_no_tokens():
    from msa_train.model.experts import grouped_linear

    g = torch.Generator().manual_seed(5)
    x = torch.randn(13, 16, generator=g, requires_grad=True)
    w = torch.randn(3, 24, 16, generator=g, requires_grad=True)
    counts = torch.tensor([6, 0, 7])
    out = grouped_linear(x, w, torch.cumsum(counts, 0, dtype=torch.int32))
    ref = torch.cat([x[:6] @ w[0].T, x[6:] @ w[2].T])
    torch.testing.assert_close(out, ref)
    grad = torch.randn(out.shape, generator=g)
    dx, dw = torch.autograd.grad(out, (x, w), grad)
    rdx, rdw = torch.autograd.grad(ref, (x, w), grad)
    torch.testing.assert_close(dx, rdx)
    torch.testing.assert_close(dw, rdw)
    assert torch.count_nonzero(dw[1]) == 0


@pytest.mark.parametrize("chunk_tokens", [1, 5, 10_000])  # one token, odd chunks, one chunk
def test_chunked_loss_equals_megatron_loss(megatron_1rank, monkeypatch, chunk_tokens):
    from msa_train.model import lm_loss

    ref, _ = _build(9)
    fast = _twin(ref, lm_loss="chunked")
    vocab = ref.config.gpt_vocab_size
    monkeypatch.setattr(lm_loss, "_CHUNK_LOGITS", chunk_tokens * vocab)
    calls = []
    real = lm_loss._chunk_loss
    monkeypatch.setattr(lm_loss, "_chunk_loss", lambda *a: calls.append(1) or real(*a))
    _compare(ref, fast, seed=13, atol=1e-5)
    assert len(calls) >= -(-B * S // chunk_tokens)  # the chunking really happened


def test_chunked_loss_without_labels_returns_logits(megatron_1rank):
    ref, _ = _build(9)
    fast = _twin(ref, lm_loss="chunked")
    tokens = torch.randint(0, ref.config.gpt_vocab_size, (B, S),
                           generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        torch.testing.assert_close(fast(tokens, None, None), ref(tokens, None, None))
    assert "forward" not in vars(fast.output_layer)  # the deferral never outlives a call

