"""Declarative mapping tables: one `Family` per Hugging Face architecture.

A family says which config.json it accepts (`model_types`), how config.json becomes a ModelConfig
(`to_model`) and back (`to_hf`), and which Megatron tensor is made of which Hugging Face tensors
(`rules`). The generic converter (msa_train.convert.importer / exporter) walks the rules; a new
architecture is one more table.

Rule templates: `{i}` is the layer index (0-based in both worlds, Megatron's checkpoint keys use
global layer numbers), `{e}` the routed-expert index. `when` names the feature a layer (or the
model) must have for the rule to apply (see `layer_features`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, Optional, Tuple

from msa_train.model.config import ModelConfig

# How the Hugging Face tensors of a rule combine into the one Megatron tensor.
#   copy     one tensor, same layout
#   qkv      q, k, v projections -> Megatron's fused linear_qkv, rows grouped per KV head:
#            [q heads of group 0, k head 0, v head 0, q heads of group 1, ...]
#   gate_up  gate, up projections -> fused SwiGLU linear_fc1 rows [gate; up]
#   experts / experts_gate_up   the same per routed expert `{e}`, stacked on a leading axis
KINDS = ("copy", "qkv", "gate_up", "experts", "experts_gate_up")


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the key, field or option."""


@dataclass(frozen=True)
class Rule:
    megatron: str
    hf: Tuple[str, ...]
    kind: str = "copy"
    when: str = "always"
    # Tensors the Hugging Face side may lack (the MSA index branch of a dense model): the import
    # initialises them afresh (normal(0, init_method_std), norms at one).
    fresh_if_missing: bool = False
    # Kept in float32 whatever --dtype says (the router's expert bias: Megatron keeps it fp32).
    fp32: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown rule kind {self.kind!r}; one of {KINDS}")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: Tuple[str, ...]  # config.json "model_type" values this table reads
    architecture: str  # config.json "architectures"[0] written on export
    rules: Tuple[Rule, ...]
    to_model: Callable[[Dict[str, Any]], Dict[str, Any]]  # config.json -> ModelConfig kwargs
    to_hf: Callable[[ModelConfig], Dict[str, Any]]  # ModelConfig -> config.json fields
    # Families whose checkpoints carry MSA layers of their own (MiniMax-M3):
    #   to_attention: config.json -> AttentionConfig kwargs (the import uses it, not --attention);
    #   wrap_hf: (flat config.json fields, AttentionConfig, source config.json) -> the exported one.
    to_attention: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None
    wrap_hf: Optional[Callable[[Dict[str, Any], Any, Dict[str, Any]], Dict[str, Any]]] = None
    # Hugging Face tensors deliberately left out: (key, num_layers) -> a reason label, or None.
    skip: Optional[Callable[[str, int], Optional[str]]] = None
    # config.json "architectures" values this table reads (besides model_types).
    architectures_in: Tuple[str, ...] = ()


def layer_features(model: ModelConfig, attn, layer: int) -> FrozenSet[str]:
    """Features of one decoder layer (attn: AttentionConfig), matched against Rule.when."""
    feats = {"always", "layer"}
    msa_mask = attn.layer_mask(model.num_layers)
    feats.add("moe" if model.moe_layout()[layer] else "dense_mlp")
    if model.moe_layout()[layer] and model.moe_shared_expert_intermediate_size:
        feats.add("moe_shared")
    if model.moe_layout()[layer] and model.moe_router_enable_expert_bias:
        feats.add("moe_expert_bias")
    if model.qk_layernorm:
        feats.add("qk_norm")
    if model.add_qkv_bias:
        feats.add("qkv_bias")
    if msa_mask[layer]:
        feats.add("msa")
        if attn.index_norm:
            feats.add("msa_index_norm")
    return frozenset(feats)


def model_features(model: ModelConfig) -> FrozenSet[str]:
    feats = {"always"}
    if model.untie_embeddings_and_output_weights:
        feats.add("untied")
    return frozenset(feats)


def is_layer_rule(rule: Rule) -> bool:
    return "{i}" in rule.megatron


def with_hf_prefix(rules: Tuple[Rule, ...], prefix: str,
                   fresh_if_missing: Optional[bool] = None) -> Tuple[Rule, ...]:
    """The same rules with every Hugging Face name under `prefix` (a model nested in a larger
    checkpoint, e.g. "language_model." of a vision-language one)."""
    out = []
    for rule in rules:
        changes: Dict[str, Any] = {"hf": tuple(prefix + name for name in rule.hf)}
        if fresh_if_missing is not None:
            changes["fresh_if_missing"] = fresh_if_missing
        out.append(dataclasses.replace(rule, **changes))
    return tuple(out)


def expand(template: str, layer: Optional[int] = None, expert: Optional[int] = None) -> str:
    out = template
    if layer is not None:
        out = out.replace("{i}", str(layer))
    if expert is not None:
        out = out.replace("{e}", str(expert))
    return out


# --------------------------------------------------------------------------- shared rule sets
EMBEDDING = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), when="untied"),
)

L = "decoder.layers.{i}."
H = "model.layers.{i}."
ATTENTION = (
    Rule(L + "input_layernorm.weight", (H + "input_layernorm.weight",)),
    Rule(L + "self_attention.linear_qkv.weight",
         (H + "self_attn.q_proj.weight", H + "self_attn.k_proj.weight", H + "self_attn.v_proj.weight"),
         kind="qkv"),
    Rule(L + "self_attention.linear_proj.weight", (H + "self_attn.o_proj.weight",)),
    Rule(L + "pre_mlp_layernorm.weight", (H + "post_attention_layernorm.weight",)),
)
QKV_BIAS = (
    Rule(L + "self_attention.linear_qkv.bias",
         (H + "self_attn.q_proj.bias", H + "self_attn.k_proj.bias", H + "self_attn.v_proj.bias"),
         kind="qkv", when="qkv_bias"),
)
QK_NORM = (
    Rule(L + "self_attention.q_layernorm.weight", (H + "self_attn.q_norm.weight",), when="qk_norm"),
    Rule(L + "self_attention.k_layernorm.weight", (H + "self_attn.k_norm.weight",), when="qk_norm"),
)
DENSE_MLP = (
    Rule(L + "mlp.linear_fc1.weight", (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"),
         kind="gate_up", when="dense_mlp"),
    Rule(L + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",), when="dense_mlp"),
)
# The MSA index branch, named as in MiniMax-M3's checkpoints (self_attn.index_{q,k}_{proj,norm}).
# Dense families have no such tensors: they start fresh. The exported MSA model carries them.
INDEX_BRANCH = (
    Rule(L + "self_attention.core_attention.indexer.linear_qi.weight",
         (H + "self_attn.index_q_proj.weight",), when="msa", fresh_if_missing=True),
    Rule(L + "self_attention.core_attention.indexer.weight_ki",
         (H + "self_attn.index_k_proj.weight",), when="msa", fresh_if_missing=True),
    Rule(L + "self_attention.core_attention.indexer.q_norm_weight",
         (H + "self_attn.index_q_norm.weight",), when="msa_index_norm", fresh_if_missing=True),
    Rule(L + "self_attention.core_attention.indexer.k_norm_weight",
         (H + "self_attn.index_k_norm.weight",), when="msa_index_norm", fresh_if_missing=True),
)
