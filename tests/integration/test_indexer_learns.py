"""The indexer learns: one MSA layer (msa_train.model.MSACoreAttention, the production path:
index projections -> msa_kernels select / attention / KL -> KLAutoScaler -> kl_tracker) against a
fixed, peaked teacher that the index branch can represent exactly.

A second teacher is purely positional (its logits depend on i - j only, as a RoPE recency head's
do) while the layer input carries no position: the paper's content-only index branch cannot fit
it, the index-RoPE branch (attention.index_rope) can. This is what the tiny_cpu run hits
(docs/experiments/2026-11-26_tiny_scale_study.md).

Only W_qi / W_ki are optimized (Adam). The KL must fall by a large factor in both stages, the
sparse selection must converge to the teacher's own top-k blocks, gradient ascent (negative loss
scale) must make it rise (so the check discriminates), and d KL / d W_qi, d W_ki from the kernels
must match finite differences of the independent float64 oracle.
"""

import math

import pytest
import torch

from . import kl_oracle

S, B = 64, 2  # two 64-token sequences: 8 blocks of 8 tokens each
HIDDEN, HQ, HKV, D, DI = 32, 4, 2, 8, 16
BLOCK, TOPK = 8, 3


def make_layer(mode: str, index_dim: int = DI, index_rope: bool = False):
    from megatron.core.transformer.enums import AttnMaskType

    from msa_train.model import (
        AttentionConfig,
        ModelConfig,
        MSACoreAttention,
        build_transformer_config,
    )

    model_cfg = ModelConfig(name="unit", num_layers=2, hidden_size=HIDDEN, ffn_hidden_size=64,
                            num_attention_heads=HQ, num_query_groups=HKV, kv_channels=D,
                            vocab_size=64, rotary_percent=0.5, num_moe_experts=None)
    attn_cfg = AttentionConfig(block_size=BLOCK, topk=TOPK, index_dim=index_dim,
                               dense_first_layers=1, kl_coeff=1.0, mode=mode,
                               index_rope=index_rope)
    cfg = build_transformer_config(model_cfg, attn_cfg, {})
    layer = MSACoreAttention(cfg, layer_number=2, attn_mask_type=AttnMaskType.causal)
    layer.train()
    return layer


def learnable_teacher(alpha: float = 3.0, seed: int = 0):
    """Teacher logits alpha * <x_i Wq_r, x_j Wk_r> / sqrt(D), the same for the G heads of group r:
    an index branch with Di >= Hkv * D can represent it exactly (q_idx_r = x Wq_r in slot r of
    k_idx = [x Wk_0, x Wk_1]), so the optimal KL is 0. alpha sharpens the attention."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(S, B, HIDDEN, generator=gen)
    wq = torch.randn(HIDDEN, HKV * D, generator=gen) / math.sqrt(HIDDEN)
    wk = torch.randn(HIDDEN, HKV * D, generator=gen) / math.sqrt(HIDDEN)
    q = (x @ wq).view(S, B, HKV, D).repeat_interleave(HQ // HKV, dim=2) * alpha  # [s, b, Hq, D]
    k = (x @ wk).view(S, B, HKV, D)
    v = torch.randn(S, B, HKV, D, generator=gen)
    return q, k, v, x


def layer_kl(layer, q, k, v, x, backward: bool = True) -> float:
    """One forward (+ backward of the KL's injected gradient only); the tracker's KL value."""
    from msa_train.model import kl_tracker

    layer.pending_input = x
    out = layer(q, k, v, None)
    if backward:
        (out * 0).sum().backward()  # the LM side contributes nothing: only the KL trains
    return kl_tracker.get_kl_metrics(reset=True)[layer.layer_number]


def train_indexer(layer, data, steps: int, lr: float = 1e-2, loss_scale: float = 1.0):
    from msa_train.model import set_kl_loss_scale

    set_kl_loss_scale(loss_scale)
    params = list(layer.indexer.parameters())
    assert {id(p) for p in params} == {id(p) for p in layer.parameters()}  # nothing else to train
    opt = torch.optim.Adam(params, lr=lr)
    curve = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        curve.append(layer_kl(layer, *data))
        opt.step()
    curve.append(layer_kl(layer, *data, backward=False))  # the KL is only computed with grad on
    return curve


def select(q_idx, k_idx) -> torch.Tensor:
    import msa_kernels

    cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32)
    with torch.no_grad():
        return msa_kernels.select_blocks(q_idx, k_idx, cu, BLOCK, TOPK, index_scale=DI ** -0.5)


def exact_index(q, k, x):
    """q_idx, k_idx whose scores equal the teacher's group logits (the optimum of the KL)."""
    scale = math.sqrt(DI) / math.sqrt(D)  # undo the index scale, apply the teacher's
    qg = kl_oracle.pack(q)[:, :: HQ // HKV].float()  # [T, Hkv, D] one head per group
    kp = kl_oracle.pack(k).float()  # [T, Hkv, D]
    q_idx = torch.zeros(qg.shape[0], HKV, DI)
    for r in range(HKV):
        q_idx[:, r, r * D:(r + 1) * D] = qg[:, r] * scale
    return q_idx, kp.reshape(kp.shape[0], HKV * D)


def selection_agreement(layer, q, k, x) -> float:
    """Fraction of the layer's selected blocks that an exact indexer also selects."""
    from msa_train.model.packing import batch_layout

    with torch.no_grad():
        mine = select(*layer._index_tensors(x, batch_layout(S, B, torch.device("cpu"))))
    exact = select(*exact_index(q, k, x))
    valid = mine >= 0
    assert torch.equal(valid, exact >= 0)
    shared = (mine[..., :, None] == exact[..., None, :]).any(-1) & valid
    return float(shared.sum() / valid.sum())


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_indexer_fits_a_learnable_teacher(megatron_1rank, mode):
    torch.manual_seed(0)
    layer = make_layer(mode)
    data = learnable_teacher()
    agree_before = selection_agreement(layer, data[0], data[1], data[3])
    init_state = {n: p.detach().clone() for n, p in layer.named_parameters()}
    curve = train_indexer(layer, data, steps=150)
    first, last = curve[0], curve[-1]
    assert first > 0.5, f"teacher is not peaked enough to test anything (KL at init {first:.3g})"
    assert last < first / 20, f"{mode}: KL only went {first:.4g} -> {last:.4g} in 150 Adam steps"
    # What the KL is for: the trained indexer selects the blocks an exact indexer selects.
    agree_after = selection_agreement(layer, data[0], data[1], data[3])
    assert agree_after > 0.92 and agree_after > agree_before + 0.15, (agree_before, agree_after)

    # Control: gradient ascent from the same start must increase the KL (sign and reach of the
    # injected gradient), so the fall above is caused by the KL gradient, not by chance.
    with torch.no_grad():
        for n, p in layer.named_parameters():
            p.copy_(init_state[n])
    ascent = train_indexer(layer, data, steps=20, loss_scale=-1.0)
    assert ascent[-1] > 1.5 * ascent[0], f"{mode}: ascent {ascent[0]:.4g} -> {ascent[-1]:.4g}"


def _oracle_kl(layer, data, w_qi, w_ki, topk_idx) -> torch.Tensor:
    q, k, _, x = data
    mask = kl_oracle.support_mask([S] * B, HKV, topk_idx, BLOCK)
    q_idx, k_idx = kl_oracle.index_projections(x, w_qi, w_ki, HKV)
    return kl_oracle.indexer_kl(kl_oracle.pack(q), kl_oracle.pack(k), q_idx, k_idx, mask,
                                layer.softmax_scale, DI ** -0.5)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_kl_gradient_matches_finite_differences(megatron_1rank, mode, monkeypatch):
    import msa_kernels

    from msa_train.model import set_kl_loss_scale

    torch.manual_seed(1)
    layer = make_layer(mode)
    with torch.no_grad():  # a trained-looking indexer: Q far from uniform, gradients O(1)
        for p in layer.indexer.parameters():
            p.normal_(0, 0.3)
    data = learnable_teacher(alpha=2.0, seed=1)
    picked = {}
    real_select = msa_kernels.select_blocks

    def recording_select(*args, **kwargs):
        picked["topk"] = real_select(*args, **kwargs)
        return picked["topk"]

    monkeypatch.setattr(msa_kernels, "select_blocks", recording_select)
    coeff = 0.7  # lambda * loss scale: the injected gradient is coeff * d KL / d W
    set_kl_loss_scale(coeff)
    layer.zero_grad(set_to_none=True)
    layer_kl(layer, *data)
    w_qi, w_ki = layer.indexer.linear_qi.weight, layer.indexer.weight_ki
    grads = [w_qi.grad.double() / coeff, w_ki.grad.double() / coeff]
    topk = picked.get("topk")  # None in dense mode (full causal support)
    assert (topk is not None) == (mode == "sparse")

    base = [w_qi.detach().double(), w_ki.detach().double()]
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):  # random directions in (W_qi, W_ki) space
        dirs = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in base]
        eps = 1e-4
        plus = _oracle_kl(layer, data, *[w + eps * d for w, d in zip(base, dirs)], topk)
        minus = _oracle_kl(layer, data, *[w - eps * d for w, d in zip(base, dirs)], topk)
        numeric = float((plus - minus) / (2 * eps))
        analytic = float(sum((g * d).sum() for g, d in zip(grads, dirs)))
        assert abs(numeric) > 1e-2  # a direction the KL actually depends on
        assert analytic == pytest.approx(numeric, rel=2e-3), (mode, analytic, numeric)


def positional_teacher(alpha: float = 4.0, seed: int = 3):
    """Teacher logits that depend only on the relative position i - j (RoPE of constant vectors,
    the index branch's own RoPE frequencies); the layer input is content only, plus a constant
    channel, so an index branch WITH RoPE can represent the teacher exactly and one without can
    only produce position-blind scores."""
    from msa_train.model.indexer import apply_index_rope

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(S, B, HIDDEN, generator=gen)
    x[..., -1] = 1.0  # constant feature: lets q_idx / k_idx be position-independent vectors
    pos = torch.arange(S).repeat(B)  # packed positions
    rope_dim = int(DI * 0.5) // 2 * 2  # the index branch's RoPE dims (rotary_percent 0.5)
    assert rope_dim == D
    a = torch.randn(HKV, D, generator=gen) * alpha
    c = torch.randn(HKV, D, generator=gen)
    q = apply_index_rope(a.expand(B * S, HKV, D), pos, rope_dim, 10000.0)  # [T, Hkv, D]
    k = apply_index_rope(c.expand(B * S, HKV, D), pos, rope_dim, 10000.0)

    def unpack(t):  # packed [b*s, H, D] -> Megatron [s, b, H, D]
        return t.reshape(B, S, *t.shape[1:]).transpose(0, 1).contiguous()

    q = unpack(q).repeat_interleave(HQ // HKV, dim=2)
    v = torch.randn(S, B, HKV, D, generator=gen)
    return q, unpack(k), v, x


def uniform_student_kl(data) -> float:
    """Dense-support KL of a student with constant scores (uniform): the no-information level."""
    q, k, _, _ = data
    zero_q, zero_k = torch.zeros(B * S, HKV, DI), torch.zeros(B * S, DI)
    mask = kl_oracle.support_mask([S] * B, HKV)
    return float(kl_oracle.indexer_kl(kl_oracle.pack(q), kl_oracle.pack(k), zero_q, zero_k, mask,
                                      D ** -0.5, DI ** -0.5))


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_positional_teacher_needs_index_rope(megatron_1rank, mode):
    data = positional_teacher()
    uniform = uniform_student_kl(data)
    assert uniform > 0.3, f"positional teacher too flat ({uniform:.3g})"
    finals = {}
    for rope in (False, True):
        torch.manual_seed(0)
        finals[rope] = train_indexer(make_layer(mode, index_rope=rope), data, steps=150)[-1]
    if mode == "dense":  # content only: stuck near the uniform student (no position in its input)
        assert finals[False] > 0.5 * uniform, (uniform, finals)
    # With index RoPE the same optimizer, data and steps fit it (sparse: on its own support).
    assert finals[True] < finals[False] / 10, (mode, uniform, finals)
