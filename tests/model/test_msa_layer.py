"""MSA layer on one rank: dense = GQA attention, sparse with full budget = dense, KL gradients
reach only the index branch, stop-gradient on the index input, recompute, packed documents,
mode switch, recall, errors."""

import math

import pytest
import torch

from tests.model.conftest import tiny_cfgs

S, B = 24, 2  # 6 blocks of 4 tokens


def gqa_reference(q, k, v, scale):
    """q [s, b, Hq, D], k/v [s, b, Hkv, D] -> [s, b, Hq*D]: plain causal GQA softmax attention."""
    s, b, hq, d = q.shape
    g = hq // k.shape[2]
    k = k.repeat_interleave(g, dim=2)
    v = v.repeat_interleave(g, dim=2)
    logits = torch.einsum("ibhd,jbhd->bhij", q.double(), k.double()) * scale
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    out = torch.einsum("bhij,jbhd->ibhd", probs, v.double())
    return out.reshape(s, b, hq * d).to(q.dtype)


def make_core(layer=2, mode="dense", **attn):
    from megatron.core.transformer.enums import AttnMaskType

    from msa_train.model import MSACoreAttention, build_transformer_config

    model_cfg, attn_cfg = tiny_cfgs(moe=False, **attn)
    attn_cfg.mode = mode
    cfg = build_transformer_config(model_cfg, attn_cfg, {})
    core = MSACoreAttention(cfg, layer_number=layer, attn_mask_type=AttnMaskType.causal)
    with torch.no_grad():
        for p in core.parameters():
            p.normal_(0, 0.3)
    return core, cfg


def inputs(cfg, seed=0, s=S, b=B):
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    q = torch.randn(s, b, hq, d, generator=gen)
    k = torch.randn(s, b, hkv, d, generator=gen)
    v = torch.randn(s, b, hkv, d, generator=gen)
    x = torch.randn(s, b, cfg.hidden_size, generator=gen)
    return q, k, v, x


def run(core, q, k, v, x, **kw):
    core.pending_input = x
    return core(q, k, v, None, **kw)


@pytest.mark.parametrize("layer", [1, 2])  # 1: full-attention layer, 2: MSA layer (dense mode)
def test_dense_mode_equals_gqa_attention(megatron_1rank, layer):
    core, cfg = make_core(layer=layer, mode="dense")
    assert core.is_msa == (layer == 2)
    q, k, v, x = inputs(cfg)
    out = run(core, q, k, v, x)
    ref = gqa_reference(q, k, v, 1 / math.sqrt(cfg.kv_channels))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_sparse_with_full_budget_equals_dense(megatron_1rank):
    core, cfg = make_core(mode="sparse", topk=S // 4)  # topk = number of blocks
    q, k, v, x = inputs(cfg, seed=1)
    out = run(core, q, k, v, x)
    ref = gqa_reference(q, k, v, 1 / math.sqrt(cfg.kv_channels))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Non-vacuous: with a budget of 2 blocks the output differs.
    core2, _ = make_core(mode="sparse", topk=2)
    core2.load_state_dict(core.state_dict())
    assert (run(core2, q, k, v, x) - ref).abs().max() > 1e-3


def test_index_branch_has_stop_gradient(megatron_1rank):
    from msa_train.model import set_kl_loss_scale

    set_kl_loss_scale(1.0)
    for mode in ("dense", "sparse"):
        core, cfg = make_core(mode=mode)
        core.train()
        q, k, v, x = inputs(cfg, seed=2)
        for t in (q, k, v, x):
            t.requires_grad_(True)
        out = run(core, q, k, v, x)
        (out * 0).sum().backward()  # only the KL's injected gradient flows
        assert x.grad is None  # sg(X): nothing reaches the layer input through the indexer
        for t in (q, k, v):  # the teacher is detached
            assert t.grad is None or torch.count_nonzero(t.grad) == 0
        grads = {n: p.grad for n, p in core.named_parameters()}
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), mode


def _model_grads(model, tokens, kl_coeff, mode):
    from msa_train.model import set_msa_mode

    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "msa_kl_coeff"):
            cfg.msa_kl_coeff = kl_coeff
    set_msa_mode(model, mode)
    model.zero_grad(set_to_none=True)
    loss = model(tokens, None, None, labels=tokens).float().mean()
    loss.backward()
    return loss.detach(), {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_kl_gradients_reach_only_index_weights(megatron_1rank, mode):
    from msa_train.model import build_model, build_transformer_config, kl_tracker, set_kl_loss_scale
    from msa_train.model.parity import fill_parameters

    model_cfg, attn_cfg = tiny_cfgs(moe=True)
    cfg = build_transformer_config(model_cfg, attn_cfg, {})
    model = build_model(cfg, max_seq_len=S)
    fill_parameters(model, cfg)
    set_kl_loss_scale(1.0)
    tokens = torch.randint(0, model_cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(3))
    kl_tracker.clear()
    loss0, g0 = _model_grads(model, tokens, 0.0, mode)
    loss1, g1 = _model_grads(model, tokens, 0.5, mode)
    assert torch.equal(loss0, loss1)  # the KL is not part of the returned loss
    index = [n for n in g1 if ".indexer." in n]
    assert len(index) == 2 * 2  # W_qi, W_ki in layers 2 and 3
    for name in g1:
        if name in index:
            assert g0[name] is None or torch.count_nonzero(g0[name]) == 0, name
            assert g1[name] is not None and g1[name].abs().sum() > 0, name
        else:
            assert (g0[name] is None) == (g1[name] is None), name
            if g0[name] is not None:
                assert torch.equal(g0[name], g1[name]), f"backbone grad changed by the KL: {name}"
    kl = kl_tracker.get_kl_metrics(reset=True)
    assert sorted(kl) == [2, 3] and all(v > 0 for v in kl.values())
    assert kl_tracker.get_kl_metrics() == {}


def test_selective_recompute_of_core_attention(megatron_1rank):
    from msa_train.model import build_model, build_transformer_config, kl_tracker, set_kl_loss_scale
    from msa_train.model.parity import fill_parameters

    model_cfg, attn_cfg = tiny_cfgs(moe=False)
    attn_cfg.mode = "sparse"
    tokens = torch.randint(0, model_cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(4))
    set_kl_loss_scale(1.0)
    results = []
    for recompute in (False, True):
        extra = dict(recompute_granularity="selective", recompute_modules=["core_attn"]) if recompute else {}
        cfg = build_transformer_config(model_cfg, attn_cfg, {}, **extra)
        model = build_model(cfg, max_seq_len=S)
        fill_parameters(model, cfg)
        kl_tracker.clear()
        loss = model(tokens, None, None, labels=tokens).float().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, kl_tracker.get_kl_metrics()))
    (l0, g0, k0), (l1, g1, k1) = results
    torch.testing.assert_close(l0, l1)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-5, atol=1e-7)
    assert k0.keys() == k1.keys() and all(abs(k0[i] - k1[i]) < 1e-6 for i in k0)  # counted once


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_packed_documents_equal_separate_sequences(megatron_1rank, mode):
    from megatron.core.packed_seq_params import PackedSeqParams

    core, cfg = make_core(mode=mode)
    core.eval()
    lens = [11, 4, 9]  # not multiples of the block size, one shorter than... a block
    docs = [inputs(cfg, seed=10 + i, s=n, b=1) for i, n in enumerate(lens)]
    separate = torch.cat([run(core, *d)[:, 0] for d in docs])  # [T, Hq*D]
    cat = [torch.cat([d[j][:, 0] for d in docs]) for j in range(4)]  # [T, ...]
    cu = torch.tensor([0, 11, 15, 24], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                          max_seqlen_q=11, max_seqlen_kv=11)
    core.pending_input = cat[3].unsqueeze(1)  # [T, 1, h]
    packed = core(cat[0], cat[1], cat[2], None, packed_seq_params=psp)
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-6)


def test_set_msa_mode_switches_at_runtime(megatron_1rank):
    from msa_train.model import MSACoreAttention, build_model, build_transformer_config, set_msa_mode

    model_cfg, attn_cfg = tiny_cfgs(moe=False)
    cfg = build_transformer_config(model_cfg, attn_cfg, {})
    model = build_model(cfg, max_seq_len=S)
    cores = [m for m in model.modules() if isinstance(m, MSACoreAttention)]
    assert [c.is_msa for c in cores] == [False, True, True]
    set_msa_mode(model, "sparse")
    assert all(c.mode == "sparse" for c in cores) and cfg.msa_mode == "sparse"
    with pytest.raises(ValueError, match="msa mode"):
        set_msa_mode(model, "sparse2")


def test_recall_metrics(megatron_1rank):
    from msa_train.model import compute_recall, get_recall_metrics, request_recall
    from msa_train.model.packing import batch_layout, pack

    core, cfg = make_core(mode="sparse", topk=2)
    q, k, v, x = inputs(cfg, seed=5)
    request_recall()
    run(core, q, k, v, x)
    metrics = get_recall_metrics()
    assert 0 < metrics["msa/block_recall"] <= 1 and 0 < metrics["msa/score_recall"] <= 1
    assert "msa/block_recall/layer_01" in metrics  # layer_number 2 -> 0-based key, as indexer_kl/layer_XX
    # Selecting every block: both recalls are exactly 1.
    nb = S // cfg.msa_block_size
    all_blocks = torch.arange(nb, dtype=torch.int32).expand(cfg.num_query_groups, S * B, nb).contiguous()
    pos = torch.arange(S).repeat(B)
    all_blocks = torch.where(all_blocks <= (pos // cfg.msa_block_size)[None, :, None], all_blocks, -1)
    sums = compute_recall(pack(q), pack(k), all_blocks, batch_layout(S, B, q.device),
                          cfg.msa_block_size, 1 / math.sqrt(cfg.kv_channels))
    assert sums[2] == S * B * cfg.num_query_groups
    torch.testing.assert_close(sums[0] / sums[2], torch.tensor(1.0))
    torch.testing.assert_close(sums[1] / sums[2], torch.tensor(1.0))


def test_bad_inputs_raise_clear_errors(megatron_1rank):
    from msa_train.model import build_transformer_config

    core, cfg = make_core()
    q, k, v, x = inputs(cfg)
    core.pending_input = x
    with pytest.raises(ValueError, match="attention_mask"):
        core(q, k, v, torch.ones(B, 1, S, S, dtype=torch.bool))
    model_cfg, attn_cfg = tiny_cfgs()
    with pytest.raises(ValueError, match=r"parallel\.tp"):
        build_transformer_config(model_cfg, attn_cfg, {"tp": 3})
    with pytest.raises(ValueError, match=r"parallel\.ep"):
        build_transformer_config(model_cfg, attn_cfg, {"ep": 3})
    with pytest.raises(ValueError, match="params_dtype"):
        build_transformer_config(model_cfg, attn_cfg, {}, params_dtype="fp8")


def test_kl_gradient_follows_loss_scale_and_coeff(megatron_1rank):
    from msa_train.model import kl_loss_scale, set_kl_loss_scale

    assert kl_loss_scale(4, cp_size=2) == 0.5
    assert kl_loss_scale(4, 2, 8.0) == 4.0
    with pytest.raises(ValueError, match="num_microbatches"):
        kl_loss_scale(0)
    core, cfg = make_core(mode="sparse")
    core.train()
    q, k, v, x = inputs(cfg, seed=6)
    grads = []
    for scale, coeff in ((1.0, 0.5), (3.0, 0.5), (1.0, 1.0)):
        set_kl_loss_scale(scale)
        cfg.msa_kl_coeff = coeff
        core.zero_grad(set_to_none=True)
        (run(core, q, k, v, x) * 0).sum().backward()
        grads.append(core.indexer.weight_ki.grad.clone())
    set_kl_loss_scale(1.0)
    torch.testing.assert_close(grads[1], 3 * grads[0])
    torch.testing.assert_close(grads[2], 2 * grads[0])


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_kernel_backend_comes_from_the_config(megatron_1rank, monkeypatch, mode):
    """attention.kernels reaches every msa_kernels call of the layer (no environment variable)."""
    import msa_kernels

    monkeypatch.setenv("MSA_KERNELS_BACKEND", "triton")  # must be ignored by the layer
    seen = []
    for name in ("select_blocks", "sparse_attention_and_kl", "indexer_kl_dense"):
        real = getattr(msa_kernels, name)
        monkeypatch.setattr(msa_kernels, name,
                            lambda *a, _real=real, _name=name, **kw: seen.append((_name, kw["backend"]))
                            or _real(*a, **kw))
    core, cfg = make_core(mode=mode, kernels="reference")
    core.train()
    q, k, v, x = (t.requires_grad_() for t in inputs(cfg, seed=5))
    run(core, q, k, v, x)
    assert seen and all(backend == "reference" for _, backend in seen), seen
