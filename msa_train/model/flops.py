"""Parameter counts and per-token FLOPs, analytic (no weights), by the formulas of docs/MSA.md.

Counts match the Megatron model that build_model creates (tests/model checks that on the meta
device). Training FLOPs per token = 6 x (active matmul parameters) + attention, where attention
per layer and token is (d = head dim, Hq/Hkv heads, Di index dim, c = causal pairs per token,
p = sparse pairs per token, both averaged over the positions of a seq_len sequence):
  dense attention          fwd 4 d Hq c, backward 2.5 x forward
  MSA main branch          fwd 4 d Hq p, backward 2.5 x forward
  indexer (selection)      2 Di Hkv c
  KL                       2 (d Hq + 3 Di Hkv) x (p in sparse mode, c in the dense warmup)
MoE layers count only the routed top-k experts (plus shared experts) as active.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

from msa_train.model.config import AttentionConfig, ModelConfig

FLOP_MODES = ("dense", "sparse", "dense_equivalent")


@dataclass
class ParamCounts:
    total: int
    active: int  # per token: routed top-k experts only
    embedding: int  # input embedding (+ untied output layer)
    attention: int
    index: int
    dense_ffn: int
    moe_total: int
    moe_active: int
    norms: int

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)


def _ffn_params(h: int, f: int, gated: bool) -> int:
    return h * f * (3 if gated else 2)


def count_parameters(model: ModelConfig, attn: AttentionConfig) -> ParamCounts:
    h, L = model.hidden_size, model.num_layers
    d, hq, hkv = model.kv_channels, model.num_attention_heads, model.num_query_groups
    norm_size = h * (2 if model.normalization == "LayerNorm" else 1)
    embedding = model.vocab_size * h * (2 if model.untie_embeddings_and_output_weights else 1)
    attention = L * (h * (hq * d + 2 * hkv * d) + hq * d * h)
    qk_norm = (2 * d * (2 if model.normalization == "LayerNorm" else 1)) if model.qk_layernorm else 0
    norms = L * (2 * norm_size + qk_norm) + norm_size
    msa_layers = sum(attn.layer_mask(L))
    di = attn.index_dim
    index = msa_layers * (h * hkv * di + h * di + (2 * di if attn.index_norm else 0))
    moe_layers = sum(model.moe_layout())
    dense_ffn = (L - moe_layers) * _ffn_params(h, model.ffn_hidden_size, model.gated_linear_unit)
    moe_total = moe_active = 0
    if moe_layers:
        expert = _ffn_params(h, model.moe_ffn_hidden_size, model.gated_linear_unit)
        shared = (
            _ffn_params(h, model.moe_shared_expert_intermediate_size, model.gated_linear_unit)
            if model.moe_shared_expert_intermediate_size else 0
        )
        router = h * model.num_moe_experts
        moe_total = moe_layers * (model.num_moe_experts * expert + shared + router)
        moe_active = moe_layers * (model.moe_router_topk * expert + shared + router)
    total = embedding + attention + norms + index + dense_ffn + moe_total
    active = total - moe_total + moe_active
    return ParamCounts(total, active, embedding, attention, index, dense_ffn, moe_total,
                       moe_active, norms)


def causal_pairs_per_token(seq_len: int) -> float:
    """Mean number of visible keys per query in a causal sequence: (L + 1) / 2."""
    return (seq_len + 1) / 2.0


def sparse_pairs_per_token(seq_len: int, block_size: int, topk: int) -> float:
    """Mean keys per query under MSA, by the paper's convention: min(visible keys, topk*block_size).

    (The exact count is lower by up to block_size/2 per query once the budget is reached: the
    local block is only causally visible. The convention reproduces the paper's 6.4x / 16x /
    28.4x attention-FLOP reductions at 32K / 128K / 1M.)
    """
    budget = topk * block_size
    if seq_len <= budget:
        return (seq_len + 1) / 2.0
    within = budget * (budget + 1) // 2  # positions 0..budget-1 see i + 1 keys
    return (within + (seq_len - budget) * budget) / seq_len


def attention_flops_per_token(
    model: ModelConfig, attn: AttentionConfig, seq_len: int, kind: str, training: bool = True
) -> float:
    """One layer's attention FLOPs per token. kind: dense | msa_sparse | msa_dense (warmup)."""
    d, hq, hkv, di = model.kv_channels, model.num_attention_heads, model.num_query_groups, attn.index_dim
    c = causal_pairs_per_token(seq_len)
    p = sparse_pairs_per_token(seq_len, attn.block_size, attn.topk)
    mult = 3.5 if training else 1.0
    if kind == "dense":
        return mult * 4 * d * hq * c
    kl_per_pair = 2 * (d * hq + 3 * di * hkv)
    if kind == "msa_sparse":
        out = mult * 4 * d * hq * p + 2 * di * hkv * c
        return out + (kl_per_pair * p if training else 0.0)
    if kind == "msa_dense":
        out = mult * 4 * d * hq * c
        return out + (kl_per_pair * c if training else 0.0)
    raise ValueError(f"kind must be dense | msa_sparse | msa_dense, got {kind!r}")


def flops_per_token(
    model: ModelConfig, attn: AttentionConfig, seq_len: int, mode: str = "sparse",
    training: bool = True,
) -> float:
    """Training (or forward-only) FLOPs per token; see :func:`flops_breakdown` for the modes."""
    return flops_breakdown(model, attn, seq_len, mode, training)["total"]


def flops_breakdown(
    model: ModelConfig, attn: AttentionConfig, seq_len: int, mode: str = "sparse",
    training: bool = True,
) -> Dict[str, float]:
    """Training (or forward-only) FLOPs per token: {"total", "matmul", "attention"}.

    mode: "sparse" (stage 2), "dense" (stage 1 warmup: full attention + dense KL on MSA layers),
    "dense_equivalent" (the same backbone with full attention everywhere and no index branch;
    the baseline for speedups). The input embedding lookup is free; the output layer counts.
    """
    if mode not in FLOP_MODES:
        raise ValueError(f"mode must be one of {FLOP_MODES}, got {mode!r}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    counts = count_parameters(model, attn)
    input_embedding = model.vocab_size * model.hidden_size
    matmul_params = counts.active - counts.norms - input_embedding - (
        counts.index if mode == "dense_equivalent" else 0
    )
    if not model.untie_embeddings_and_output_weights:
        matmul_params += input_embedding  # the tied matrix is still the output GEMM
    fwd_bwd = 6 if training else 2
    matmul = fwd_bwd * matmul_params
    mask = attn.layer_mask(model.num_layers)
    attention = 0.0
    for is_msa in mask:
        if not is_msa or mode == "dense_equivalent":
            attention += attention_flops_per_token(model, attn, seq_len, "dense", training)
        else:
            kind = "msa_sparse" if mode == "sparse" else "msa_dense"
            attention += attention_flops_per_token(model, attn, seq_len, kind, training)
    return {"total": matmul + attention, "matmul": float(matmul), "attention": attention}


def attention_reduction(model: ModelConfig, attn: AttentionConfig, seq_len: int) -> float:
    """Paper metric: per-token forward attention FLOPs, dense / MSA (main branch + indexer)."""
    dense = attention_flops_per_token(model, attn, seq_len, "dense", training=False)
    msa = attention_flops_per_token(model, attn, seq_len, "msa_sparse", training=False)
    return dense / msa
