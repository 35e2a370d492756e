"""MiniMax-M3 (the text model of the vision-language checkpoint): MSA layers of its own.

Layout read: config.json nests the text model in `text_config` (a flat config.json is read too);
its weights live under `language_model.model.*`, the output layer is `language_model.lm_head`.
Vision tensors (anything outside `language_model.`) are left out with one note; the multi-token
prediction modules (`language_model.model.mtp.*`, or layers past num_hidden_layers) are left out
with a warning: msa-train does not build MTP modules (no MTP loss in the trainer yet).

Architecture: every RMSNorm zero-centred (Gemma-style, stored as an offset from one), per-head
q/k norm, partial RoPE (`rotary_dim` of `head_dim`), dense MLP on the first layers then MoE with
sigmoid scores + expert score-correction bias + routed scaling + one shared expert, the clamped
"swigluoai" GLU everywhere, and the MSA index branch of `sparse_attention_config` (one index head
per KV group, per-head zero-centred index norms, index RoPE).
"""

from __future__ import annotations

import re
from typing import Any, Dict, Optional

from msa_train.convert.families.base import (ATTENTION, DENSE_MLP, EMBEDDING, INDEX_BRANCH,
                                             QK_NORM, Family, H, L, Rule, with_hf_prefix)
from msa_train.convert.families.common import need, refuse_if
from msa_train.model.config import ModelConfig

PREFIX = "language_model."
ARCHITECTURE = "MiniMaxM3SparseForConditionalGeneration"
# GPT-OSS's quick-GELU slope; Megatron's quick_gelu fixes it.
SWIGLU_ALPHA = 1.702

MOE = (
    Rule(L + "mlp.router.weight", (H + "block_sparse_moe.gate.weight",), when="moe"),
    Rule(L + "mlp.router.expert_bias", (H + "block_sparse_moe.e_score_correction_bias",),
         when="moe_expert_bias", fp32=True),
    Rule(L + "mlp.experts.experts.linear_fc1.weight",
         (H + "block_sparse_moe.experts.{e}.w1.weight", H + "block_sparse_moe.experts.{e}.w3.weight"),
         kind="experts_gate_up", when="moe"),
    Rule(L + "mlp.experts.experts.linear_fc2.weight", (H + "block_sparse_moe.experts.{e}.w2.weight",),
         kind="experts", when="moe"),
    Rule(L + "mlp.shared_experts.linear_fc1.weight",
         (H + "block_sparse_moe.shared_experts.gate_proj.weight",
          H + "block_sparse_moe.shared_experts.up_proj.weight"), kind="gate_up", when="moe_shared"),
    Rule(L + "mlp.shared_experts.linear_fc2.weight",
         (H + "block_sparse_moe.shared_experts.down_proj.weight",), when="moe_shared"),
)
# M3 carries its index branch: nothing starts fresh (a missing index tensor is an error).
RULES = with_hf_prefix(EMBEDDING + ATTENTION + QK_NORM + DENSE_MLP + MOE, PREFIX) \
    + with_hf_prefix(INDEX_BRANCH, PREFIX, fresh_if_missing=False)


def text_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return cfg.get("text_config") or cfg


def _rope_theta(text: Dict[str, Any]) -> float:
    params = text.get("rope_parameters") or {}
    return float(params.get("rope_theta") or text.get("rope_theta") or 5_000_000.0)


def _moe_layout(text: Dict[str, Any], n: int):
    freq = text.get("moe_layer_freq")
    if isinstance(freq, list):
        refuse_if(len(freq) != n, f"config.json moe_layer_freq has {len(freq)} entries for "
                                  f"{n} layers")
        return [int(bool(x)) for x in freq]
    first = int(text.get("first_k_dense_replace", 0) or 0)
    return [0] * first + [1] * (n - first)


def to_model(cfg: Dict[str, Any]) -> Dict[str, Any]:
    text = text_config(cfg)
    act = text.get("hidden_act", "swigluoai")
    refuse_if(act != "swigluoai", f"config.json text_config.hidden_act={act!r}: MiniMax-M3 uses "
                                  "'swigluoai' (restore it from the original checkpoint's config)")
    alpha = float(text.get("swiglu_alpha", SWIGLU_ALPHA))
    refuse_if(abs(alpha - SWIGLU_ALPHA) > 1e-6,
              f"config.json swiglu_alpha={alpha}: only {SWIGLU_ALPHA} is supported")
    refuse_if(bool(text.get("attention_bias")), "config.json attention_bias=true is not supported")
    refuse_if(float(text.get("swiglu_beta", 1.0)) != 1.0, "config.json swiglu_beta != 1 (the "
              "up + 1 offset) is not supported")
    hidden = int(need(text, "hidden_size"))
    heads = int(need(text, "num_attention_heads"))
    head_dim = int(text.get("head_dim") or hidden // heads)
    rotary_dim = int(text.get("rotary_dim")
                     or round(float(text.get("partial_rotary_factor", 1.0)) * head_dim))
    n = int(need(text, "num_hidden_layers"))
    layout = _moe_layout(text, n)
    out = dict(
        num_layers=n, hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=int(text.get("num_key_value_heads") or heads), kv_channels=head_dim,
        vocab_size=int(need(text, "vocab_size")),
        max_position_embeddings=int(text.get("max_position_embeddings") or 4096),
        position_embedding_type="rope", rotary_base=int(_rope_theta(text)),
        rotary_percent=rotary_dim / head_dim, normalization="RMSNorm",
        norm_epsilon=float(text.get("rms_norm_eps", 1e-6)),
        init_method_std=float(text.get("initializer_range", 0.02)), gated_linear_unit=True,
        qk_layernorm=True, untie_embeddings_and_output_weights=not bool(
            text.get("tie_word_embeddings", False)),
        norm_zero_centered=True, activation="swigluoai",
        activation_clamp=float(text.get("swiglu_limit", 7.0)),
        ffn_hidden_size=int(text.get("dense_intermediate_size") or need(text, "intermediate_size")),
    )
    if any(layout):
        refuse_if(int(text.get("n_group", 1) or 1) != 1 or int(text.get("topk_group", 1) or 1) != 1,
                  "config.json n_group / topk_group > 1 (group-limited routing) is not supported")
        refuse_if(not text.get("norm_topk_prob", True), "config.json norm_topk_prob=false is not "
                  "supported (Megatron's sigmoid router renormalises the top-k weights)")
        refuse_if(text.get("scoring_func", "sigmoid") != "sigmoid",
                  f"config.json scoring_func={text.get('scoring_func')!r}: MiniMax-M3 uses sigmoid")
        shared = int(text.get("n_shared_experts", 1) or 0)
        refuse_if(shared > 1, f"config.json n_shared_experts={shared}: at most one is supported")
        experts = int(text.get("num_local_experts") or need(text, "n_routed_experts"))
        out.update(
            num_moe_experts=experts, moe_router_topk=int(need(text, "num_experts_per_tok")),
            moe_ffn_hidden_size=int(need(text, "intermediate_size")),
            moe_shared_expert_intermediate_size=(
                int(text.get("shared_intermediate_size") or need(text, "intermediate_size"))
                if shared else None),
            moe_layer_freq=layout, moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=bool(text.get("use_routing_bias", True)),
            moe_router_topk_scaling_factor=float(text.get("routed_scaling_factor", 1.0)),
            # Aux-loss-free balancing (the expert bias) as trained; no auxiliary loss.
            moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        )
    return out


def to_attention(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """sparse_attention_config -> AttentionConfig. M3's `init_block` = the first blocks every
    query keeps (this project forces at most one: force_sink); `local_block` = the blocks ending
    at the query's own, always kept (the own block is always kept here: local_window =
    local_block - 1)."""
    text = text_config(cfg)
    sparse = text.get("sparse_attention_config")
    refuse_if(not sparse, "config.json text_config has no sparse_attention_config: not an "
                          "MSA (MiniMax-M3) checkpoint")
    kv = int(text.get("num_key_value_heads") or text["num_attention_heads"])
    heads = int(sparse.get("sparse_num_index_heads", kv))
    refuse_if(heads != kv, f"sparse_num_index_heads={heads}: one index head per KV group "
                           f"({kv}) is supported")
    init_block = int(sparse.get("sparse_init_block", 0))
    local_block = int(sparse.get("sparse_local_block", 1))
    refuse_if(init_block not in (0, 1), f"sparse_init_block={init_block}: 0 or 1 is supported")
    refuse_if(local_block < 1, f"sparse_local_block={local_block}: must be >= 1 (the query's own "
                               "block)")
    refuse_if(bool(sparse.get("sparse_use_index_value", False)),
              "sparse_attention_config with an index value is not supported")
    head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // int(text["num_attention_heads"]))
    index_dim = int(sparse.get("sparse_index_dim", 128))
    refuse_if(index_dim != head_dim, f"sparse_index_dim={index_dim} != head_dim={head_dim}: the "
              "index RoPE covers rotary_dim of head_dim channels, which needs equal sizes")
    n = int(text["num_hidden_layers"])
    freq = sparse.get("sparse_attention_freq")
    layer_map = [int(bool(x)) for x in freq] if isinstance(freq, list) else None
    refuse_if(layer_map is not None and len(layer_map) != n,
              f"sparse_attention_freq has {len(layer_map or [])} entries for {n} layers")
    return dict(
        mode="sparse", block_size=int(sparse.get("sparse_block_size", 128)),
        topk=int(sparse.get("sparse_topk_blocks", 16)), index_dim=index_dim,
        layer_map=layer_map, dense_first_layers=0 if layer_map is not None else 3,
        force_sink=bool(init_block), local_window=local_block - 1,
        index_norm=True, index_rope=True,
    )


def to_hf(m: ModelConfig) -> Dict[str, Any]:
    """The flat text_config fields (wrap_hf nests them and adds sparse_attention_config)."""
    refuse_if(not m.norm_zero_centered or m.activation != "swigluoai" or not m.qk_layernorm,
              "a MiniMax-M3 export needs model.norm_zero_centered, model.qk_layernorm and "
              "model.activation=swigluoai")
    out = dict(
        model_type="minimax_m3", hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups,
        head_dim=m.kv_channels, rotary_dim=int(round(m.rotary_percent * m.kv_channels)),
        vocab_size=m.vocab_size, max_position_embeddings=m.max_position_embeddings,
        rope_theta=float(m.rotary_base), rms_norm_eps=m.norm_epsilon,
        initializer_range=m.init_method_std, hidden_act="swigluoai", swiglu_alpha=SWIGLU_ALPHA,
        swiglu_limit=m.activation_clamp, attention_bias=False,
        tie_word_embeddings=not m.untie_embeddings_and_output_weights,
        dense_intermediate_size=m.ffn_hidden_size,
    )
    if m.num_moe_experts is not None:
        out.update(
            num_local_experts=m.num_moe_experts, num_experts_per_tok=m.moe_router_topk,
            intermediate_size=m.moe_ffn_hidden_size,
            shared_intermediate_size=m.moe_shared_expert_intermediate_size or 0,
            n_shared_experts=1 if m.moe_shared_expert_intermediate_size else 0,
            moe_layer_freq=m.moe_layout(), scoring_func="sigmoid",
            use_routing_bias=m.moe_router_enable_expert_bias, norm_topk_prob=True,
            routed_scaling_factor=m.moe_router_topk_scaling_factor or 1.0)
    else:
        out.update(intermediate_size=m.ffn_hidden_size, moe_layer_freq=[0] * m.num_layers)
    return out


def wrap_hf(flat: Dict[str, Any], attn, source: Dict[str, Any]) -> Dict[str, Any]:
    """Nest the text fields as the vision-language checkpoint does; the source's vision_config
    is not kept (the export holds no vision weights)."""
    text = {k: v for k, v in flat.items() if k not in ("architectures", "torch_dtype")}
    n = text["num_hidden_layers"]
    text["sparse_attention_config"] = dict(
        sparse_attention_freq=[int(x) for x in attn.layer_mask(n)],
        sparse_block_size=attn.block_size, sparse_topk_blocks=attn.topk,
        sparse_index_dim=attn.index_dim, sparse_num_index_heads=text["num_key_value_heads"],
        sparse_init_block=int(attn.force_sink), sparse_local_block=attn.local_window + 1,
    )
    top = {k: flat[k] for k in ("architectures", "torch_dtype") if k in flat}
    top.update({k: source[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if k in source})
    top.update(model_type=source.get("model_type", "minimax_m3_vl"), text_config=text)
    return top


_LAYER = re.compile(r"^language_model\.model\.layers\.(\d+)\.")


def skip(key: str, num_layers: int) -> Optional[str]:
    if not key.startswith(PREFIX):
        return "vision"
    if key.startswith(PREFIX + "model.mtp.") or ".mtp_" in key:
        return "mtp"
    match = _LAYER.match(key)
    if match and int(match.group(1)) >= num_layers:
        return "mtp"  # MTP modules stored as extra layers (DeepSeek-V3's layout)
    return None


FAMILY = Family(
    name="minimax_m3", model_types=("minimax_m3", "minimax_m3_vl"), architecture=ARCHITECTURE,
    rules=RULES, to_model=to_model, to_hf=to_hf, to_attention=to_attention, wrap_hf=wrap_hf,
    skip=skip, architectures_in=(ARCHITECTURE, "MiniMaxM3SparseForCausalLM"),
)
