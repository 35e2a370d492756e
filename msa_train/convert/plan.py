"""Expand a family's rules for one model into concrete (Megatron key <-> Hugging Face keys) items.

Shared by import and export, so both directions use exactly the same table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from msa_train.convert.families.base import (ConversionError, Family, Rule, expand,
                                             is_layer_rule, layer_features, model_features)
from msa_train.model.config import AttentionConfig, ModelConfig


@dataclass
class Item:
    megatron: str
    rule: Rule
    layer: int  # -1 for model-level tensors
    # Hugging Face keys: one tuple per expert for experts kinds, else a single tuple.
    hf: List[Tuple[str, ...]]

    @property
    def per_expert(self) -> bool:
        return self.rule.kind.startswith("experts")

    def hf_keys(self) -> List[str]:
        return [k for group in self.hf for k in group]


def expand_rules(family: Family, model: ModelConfig, attn: AttentionConfig) -> List[Item]:
    items: List[Item] = []
    model_feats = model_features(model)
    for layer in range(-1, model.num_layers):
        feats = model_feats if layer < 0 else layer_features(model, attn, layer)
        for rule in family.rules:
            if is_layer_rule(rule) != (layer >= 0) or rule.when not in feats:
                continue
            key = expand(rule.megatron, layer=layer if layer >= 0 else None)
            if rule.kind.startswith("experts"):
                hf = [tuple(expand(t, layer, e) for t in rule.hf) for e in range(model.num_moe_experts)]
            else:
                hf = [tuple(expand(t, layer if layer >= 0 else None) for t in rule.hf)]
            items.append(Item(key, rule, layer, hf))
    seen: Dict[str, Item] = {}
    for item in items:
        if item.megatron in seen:
            raise ConversionError(f"table {family.name}: two rules write {item.megatron}")
        seen[item.megatron] = item
    return items


def megatron_shapes(model: ModelConfig, attn: AttentionConfig) -> Dict[str, Tuple[int, ...]]:
    """Global shapes of every model tensor of the single-rank Megatron model (built on meta)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from msa_train.model.meta import build_on_meta

    ensure_parallel()
    built = build_on_meta(model, attn)
    shapes: Dict[str, Tuple[int, ...]] = {}
    for value in built.sharded_state_dict().values():
        if isinstance(value, ShardedTensor):
            shapes[value.key] = tuple(value.global_shape)
        elif isinstance(value, ShardedTensorFactory):
            # The SwiGLU factory of a routed expert: its data is one expert's [2*ffn, h] slice.
            experts = (model.num_moe_experts,) if ".experts." in value.key else ()
            shapes[value.key] = experts + tuple(value.data.shape)
    return shapes


def ensure_parallel() -> None:
    """Megatron's 1-rank parallel state (model building needs it); a no-op when one exists."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        from msa_train.compat import init_parallel

        init_parallel({})


def check_head_counts(model: ModelConfig) -> None:
    if model.num_attention_heads % model.num_query_groups:
        raise ConversionError(
            f"num_attention_heads ({model.num_attention_heads}) is not a multiple of "
            f"num_key_value_heads ({model.num_query_groups})")


def meta(shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")
