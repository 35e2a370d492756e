"""Model side of msa-train: MSA attention in Megatron-Core, configs, specs, KL tracking, counting.

Public API (docs/ARCHITECTURE.md): ModelConfig, AttentionConfig, build_transformer_config,
build_model, set_msa_mode, kl_tracker, set_kl_loss_scale / kl_loss_scale, compute_recall,
request_recall / get_recall_metrics, and the counting functions of msa_train.model.flops.

Attributes are imported lazily (PEP 562): ``from msa_train.model import ModelConfig`` (Hydra
schemas, counting) does not import Megatron-Core.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelConfig": "msa_train.model.config",
    "AttentionConfig": "msa_train.model.config",
    "MSATransformerConfig": "msa_train.model.transformer_config",
    "build_transformer_config": "msa_train.model.transformer_config",
    "build_model": "msa_train.model.builder",
    "set_msa_mode": "msa_train.model.attention",
    "MSACoreAttention": "msa_train.model.attention",
    "MSASelfAttention": "msa_train.model.attention",
    "KLAutoScaler": "msa_train.model.kl_scaler",
    "kl_loss_scale": "msa_train.model.kl_scaler",
    "set_kl_loss_scale": "msa_train.model.kl_scaler",
    "compute_recall": "msa_train.model.recall",
    "request_recall": "msa_train.model.recall",
    "get_recall_metrics": "msa_train.model.recall",
    "count_parameters": "msa_train.model.flops",
    "flops_per_token": "msa_train.model.flops",
    "flops_breakdown": "msa_train.model.flops",
}
_SUBMODULES = ("kl_tracker", "recall", "flops", "parity", "meta", "packing", "specs")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"msa_train.model.{name}")
    else:
        raise AttributeError(f"module 'msa_train.model' has no attribute {name!r}")
    globals()[name] = value
    return value
