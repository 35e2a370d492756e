"""config.json <-> ModelConfig for the Llama-like families (shared by every table)."""

from __future__ import annotations

from typing import Any, Dict, Optional

from msa_train.convert.families.base import ConversionError
from msa_train.model.config import ModelConfig


def need(cfg: Dict[str, Any], key: str) -> Any:
    if cfg.get(key) is None:
        raise ConversionError(f"config.json has no {key!r}; it is required for this architecture")
    return cfg[key]


def refuse_if(cond: bool, message: str) -> None:
    if cond:
        raise ConversionError(message)


def rope_scaling(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """config.json rope_scaling -> ModelConfig fields. Megatron implements Llama 3's scaling with
    low/high frequency factors 1 / 4 over 8192 original positions (every Llama 3.x release) and
    linear position interpolation; anything else is refused rather than silently changed."""
    rs = cfg.get("rope_scaling")
    if not rs:
        return {"rope_scaling": None, "rope_scaling_factor": 1.0}
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "default":
        return {"rope_scaling": None, "rope_scaling_factor": 1.0}
    if kind == "llama3":
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
        wrong = {k: rs.get(k) for k, v in fixed.items() if float(rs.get(k, v)) != float(v)}
        refuse_if(bool(wrong), f"config.json rope_scaling {wrong}: only Llama 3's values {fixed} "
                               "are supported (Megatron fixes them)")
        return {"rope_scaling": "llama3", "rope_scaling_factor": float(need(rs, "factor"))}
    if kind == "linear":
        return {"rope_scaling": "linear", "rope_scaling_factor": float(need(rs, "factor"))}
    raise ConversionError(f"config.json rope_scaling type {kind!r} is not supported "
                          "(supported: none, default, llama3, linear)")


def rope_scaling_to_hf(m: ModelConfig) -> Optional[Dict[str, Any]]:
    if m.rope_scaling == "llama3":
        return {"rope_type": "llama3", "factor": m.rope_scaling_factor, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if m.rope_scaling == "linear":
        return {"rope_type": "linear", "factor": m.rope_scaling_factor}
    return None


def llama_like(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Fields every supported family shares (Llama's config.json names)."""
    act = cfg.get("hidden_act", "silu")
    refuse_if(act != "silu", f"config.json hidden_act={act!r}: only SwiGLU (silu) is supported")
    refuse_if(bool(cfg.get("mlp_bias")), "config.json mlp_bias=true is not supported")
    hidden = int(need(cfg, "hidden_size"))
    heads = int(need(cfg, "num_attention_heads"))
    head_dim = cfg.get("head_dim") or hidden // heads
    out = dict(
        num_layers=int(need(cfg, "num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(need(cfg, "intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=int(cfg.get("num_key_value_heads") or heads),
        kv_channels=int(head_dim),
        vocab_size=int(need(cfg, "vocab_size")),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
        position_embedding_type="rope",
        rotary_base=int(float(cfg.get("rope_theta", 10000.0))),
        rotary_percent=1.0,
        normalization="RMSNorm",
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        init_method_std=float(cfg.get("initializer_range", 0.02)),
        gated_linear_unit=True,
        untie_embeddings_and_output_weights=not bool(cfg.get("tie_word_embeddings", False)),
    )
    out.update(rope_scaling(cfg))
    return out


def no_sliding_window(cfg: Dict[str, Any]) -> None:
    """Sliding-window attention would change the model past the window; MSA layers and the
    full-attention layers here attend causally over everything."""
    window = cfg.get("sliding_window")
    active = window is not None and cfg.get("use_sliding_window", True)
    if active and int(window) < int(cfg.get("max_position_embeddings") or 0):
        raise ConversionError(
            f"config.json sliding_window={window} (< max_position_embeddings): sliding-window "
            "attention is not supported; a checkpoint trained with it would change")


def llama_like_to_hf(m: ModelConfig) -> Dict[str, Any]:
    return dict(
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups,
        head_dim=m.kv_channels,
        vocab_size=m.vocab_size,
        max_position_embeddings=m.max_position_embeddings,
        rope_theta=float(m.rotary_base),
        rope_scaling=rope_scaling_to_hf(m),
        rms_norm_eps=m.norm_epsilon,
        initializer_range=m.init_method_std,
        hidden_act="silu",
        tie_word_embeddings=not m.untie_embeddings_and_output_weights,
    )


def moe_fields(cfg: Dict[str, Any], experts_key: str, ffn_key: str, norm_topk: bool,
               moe_layout) -> Dict[str, Any]:
    experts = int(need(cfg, experts_key))
    topk = int(need(cfg, "num_experts_per_tok"))
    refuse_if(topk == 1 and norm_topk, "num_experts_per_tok=1 with renormalised top-k weights is "
              "not supported (Megatron's top-1 router keeps the softmax probability)")
    return dict(
        num_moe_experts=experts,
        moe_router_topk=topk,
        moe_ffn_hidden_size=int(need(cfg, ffn_key)),
        moe_layer_freq=moe_layout,
        moe_router_score_function="softmax",
        # Megatron's default routing (top-k of the logits, softmax over those k) is softmax over
        # all experts then top-k renormalised; without renormalisation it is pre-softmax top-k.
        moe_router_pre_softmax=not norm_topk,
        moe_aux_loss_coeff=float(cfg.get("router_aux_loss_coef", 1e-3)),
    )
