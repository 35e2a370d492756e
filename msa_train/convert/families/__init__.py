"""The mapping tables, one module per Hugging Face family; `FAMILIES` is the registry."""

from __future__ import annotations

from typing import Any, Dict

from msa_train.convert.families import (llama, minimax_m3, mistral, mixtral, msa, qwen2, qwen3,
                                        qwen3_moe)
from msa_train.convert.families.base import ConversionError, Family, Rule
from msa_train.model.config import ModelConfig

FAMILIES: Dict[str, Family] = {f.name: f for f in (
    llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, mistral.FAMILY, qwen3_moe.FAMILY, mixtral.FAMILY,
    minimax_m3.FAMILY)}

# The MSA model's own table (export of models with MSA layers); not an import source.
MSA = msa.FAMILY


def family_for_model(model: ModelConfig) -> Family:
    """The stock architecture a model exports to: its recorded source family, else the one that
    has its features (models trained from scratch)."""
    if model.hf_family:
        if model.hf_family not in FAMILIES:
            raise ConversionError(f"model.hf_family={model.hf_family!r} is not one of {sorted(FAMILIES)}")
        return FAMILIES[model.hf_family]
    moe = model.num_moe_experts is not None
    if model.add_qkv_bias:
        name = "qwen2"
    elif moe:
        name = "qwen3_moe" if model.qk_layernorm else "mixtral"
    else:
        name = "qwen3" if model.qk_layernorm else "llama"
    if name in ("qwen2", "llama", "mixtral") and model.qk_layernorm or (model.add_qkv_bias and moe):
        raise ConversionError("no supported Hugging Face architecture has this model's mix of "
                              "qk-norm / qkv bias / MoE: export it with its MSA layers (msa model)")
    return FAMILIES[name]


def family_for_config(cfg: Dict[str, Any]) -> Family:
    model_type = cfg.get("model_type")
    architectures = set(cfg.get("architectures") or [])
    for family in FAMILIES.values():
        if model_type in family.model_types or architectures & set(family.architectures_in):
            return family
    supported = sorted(t for f in FAMILIES.values() for t in f.model_types)
    if "text_config" in cfg:
        raise ConversionError(
            f"config.json model_type={model_type!r} nests a text_config (a multimodal model) "
            f"that no table reads; supported model_type values: {supported}")
    raise ConversionError(
        f"config.json model_type={model_type!r} (architectures={cfg.get('architectures')}) is not "
        f"supported; supported model_type values: {supported}")


__all__ = ["FAMILIES", "ConversionError", "Family", "Rule", "family_for_config"]
