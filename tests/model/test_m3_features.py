"""The MiniMax-M3 architecture fields, one by one: zero-centred norms (hidden, q/k, index), the
clamped swigluoai GLU, sigmoid routing with expert bias and routed scaling; defaults unchanged."""

import pytest
import torch
import torch.nn.functional as F

from msa_train.model import (AttentionConfig, ModelConfig, build_model, build_transformer_config)

M3 = dict(norm_zero_centered=True, activation="swigluoai", activation_clamp=0.5, qk_layernorm=True,
          moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
          moe_router_topk_scaling_factor=2.0, moe_router_load_balancing_type="none",
          moe_aux_loss_coeff=0.0, moe_shared_expert_intermediate_size=14)


def _cfgs(**model):
    m = ModelConfig(name="t", num_layers=2, hidden_size=24, ffn_hidden_size=30, num_attention_heads=4,
                    num_query_groups=2, kv_channels=6, vocab_size=64, rotary_percent=0.5,
                    num_moe_experts=5, moe_router_topk=2, moe_ffn_hidden_size=10,
                    moe_first_k_dense=1, **model)
    a = AttentionConfig(block_size=4, topk=2, index_dim=6, dense_first_layers=1, index_norm=True,
                        index_rope=True)
    return m, a


@pytest.fixture(scope="module")
def m3_model(megatron_1rank):
    torch.manual_seed(0)
    return build_model(build_transformer_config(*_cfgs(**M3), {}, torch.float32))


def test_defaults_keep_the_plain_model():
    cfg = build_transformer_config(*_cfgs(), {}, torch.float32)
    assert cfg.activation_func is F.silu and cfg.glu_linear_offset == 0.0
    assert cfg.activation_func_clamp_value is None and not cfg.layernorm_zero_centered_gamma
    assert not cfg.moe_router_enable_expert_bias and cfg.moe_router_topk_scaling_factor is None


def test_zero_centred_norms_start_at_zero_and_scale_by_one_plus_w(m3_model):
    norms = {n: p for n, p in m3_model.named_parameters() if "norm" in n}
    assert any("q_layernorm" in n for n in norms) and any("indexer.q_norm" in n for n in norms)
    assert all(torch.count_nonzero(p) == 0 for p in norms.values()), "zero-centred: start at 0"
    x = torch.randn(7, 24)
    norm = m3_model.decoder.final_layernorm
    with torch.no_grad():
        norm.weight.normal_()
        expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * (1 + norm.weight)
        assert torch.allclose(norm(x), expected, atol=1e-6)
    indexer = m3_model.decoder.layers[1].self_attention.core_attention.indexer
    with torch.no_grad():
        indexer.q_norm_weight.normal_()
        indexer.k_norm_weight.normal_()
        h = torch.randn(5, 1, 24)
        q_idx, k_idx = indexer(h)
        raw_q = (h @ indexer.linear_qi.weight.T).view(5, 1, 2, 6)
        raw_k = h @ indexer.weight_ki.T
        rms = lambda t, w: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + indexer.eps) * (1 + w)
        assert torch.allclose(q_idx, rms(raw_q, indexer.q_norm_weight), atol=1e-5)
        assert torch.allclose(k_idx, rms(raw_k, indexer.k_norm_weight), atol=1e-5)


def _swigluoai(x, fc1, fc2, limit):
    gate, up = (x @ fc1.T).chunk(2, dim=-1)
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return (gate * torch.sigmoid(1.702 * gate) * (up + 1)) @ fc2.T


def test_swigluoai_dense_and_shared_expert(m3_model):
    x = torch.randn(9, 1, 24) * 3  # large enough for the clamp at 0.5 to act on both halves
    for mlp in (m3_model.decoder.layers[0].mlp, m3_model.decoder.layers[1].mlp.shared_experts):
        with torch.no_grad():
            out = mlp(x)
            out = out[0] if isinstance(out, tuple) else out  # MLP: (out, bias); shared expert: out
            fc1, fc2 = mlp.linear_fc1.weight, mlp.linear_fc2.weight
            assert torch.allclose(out, _swigluoai(x, fc1, fc2, 0.5), atol=1e-5)
            assert (x @ fc1.T).abs().max() > 0.5


def test_sigmoid_routing_with_expert_bias_and_scaling(m3_model):
    router = m3_model.decoder.layers[1].mlp.router
    x = torch.randn(11, 1, 24)
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 2.0, 0.0, -2.0, 0.0]))
        probs, routing_map = router(x)
        scores = torch.sigmoid(x.view(11, 24) @ router.weight.T)
        top = torch.topk(scores + router.expert_bias, 2, dim=-1).indices
        weights = scores.gather(-1, top)
        weights = weights / weights.sum(-1, keepdim=True) * 2.0
        expected = torch.zeros_like(scores).scatter(1, top, weights)
    assert torch.allclose(probs, expected, atol=1e-6)
    assert routing_map[:, 1].all() and not routing_map[:, 3].any()  # the bias steers the choice
    assert torch.allclose(probs.sum(-1), torch.full((11,), 2.0))


@pytest.mark.parametrize("fields,message", [
    (dict(activation="gelu"), "model.activation must be"),
    (dict(activation="swigluoai", gated_linear_unit=False), "gated_linear_unit=true"),
    (dict(moe_router_enable_expert_bias=True), "moe_router_score_function=sigmoid"),
    (dict(activation_clamp=0.0), "activation_clamp must be > 0"),
])
def test_bad_fields_name_the_fix(fields, message):
    with pytest.raises(ValueError, match=message):
        _cfgs(**fields)


def test_documented_m3_parameter_counts():
    from msa_train.model.flops import count_parameters
    from tests.model.test_config import load

    m3, attn = load("model", "minimax_m3", ModelConfig), load("attention", "m3", AttentionConfig)
    counts = count_parameters(m3, attn)
    assert counts.total == 426_174_565_632  # ~428B as published (vocabulary assumed 200064)
    assert counts.active - counts.embedding == 23_504_080_128  # ~23B active
    proxy = load("model", "minimax_m3_proxy", ModelConfig)
    proxy_attn = load("attention", "minimax_m3_proxy", AttentionConfig)
    assert proxy_attn.layer_mask(proxy.num_layers) == [0, 1, 1] and proxy.moe_layout() == [0, 1, 1]
    for field in ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "kv_channels", "rotary_percent", "moe_ffn_hidden_size", "activation",
                  "moe_shared_expert_intermediate_size", "moe_router_topk_scaling_factor",
                  "norm_zero_centered", "moe_router_enable_expert_bias", "hf_family"):
        assert getattr(proxy, field) == getattr(m3, field), field
