"""The mapping tables, one module per Hugging Face family; `FAMILIES` is the registry."""

from __future__ import annotations

from typing import Any, Dict

from msa_train.convert.families import llama, mistral, mixtral, qwen2, qwen3, qwen3_moe
from msa_train.convert.families.base import ConversionError, Family, Rule

FAMILIES: Dict[str, Family] = {f.name: f for f in (
    llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, mistral.FAMILY, qwen3_moe.FAMILY, mixtral.FAMILY)}


def family_for_config(cfg: Dict[str, Any]) -> Family:
    model_type = cfg.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ConversionError(
        f"config.json model_type={model_type!r} (architectures={cfg.get('architectures')}) is not "
        f"supported; supported model_type values: {supported}")


__all__ = ["FAMILIES", "ConversionError", "Family", "Rule", "family_for_config"]
