"""Build a model on the meta device (no weights) and count its parameters."""

from __future__ import annotations

from typing import Dict

import torch

from msa_train.model.config import AttentionConfig, ModelConfig


def count_built_parameters(model: torch.nn.Module, model_cfg: ModelConfig) -> Dict[str, int]:
    """{"total", "active"} of a built single-rank model: active keeps topk of the routed experts."""
    total = expert = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if ".local_experts." in name:
            expert += p.numel()
    active = total
    if model_cfg.num_moe_experts:
        active = total - expert + expert * model_cfg.moe_router_topk // model_cfg.num_moe_experts
    return {"total": total, "active": active}


def build_on_meta(model_cfg: ModelConfig, attn_cfg: AttentionConfig) -> torch.nn.Module:
    """The single-rank GPTModel with every parameter on the meta device.

    Needs Megatron's parallel state (msa_train.compat.init_parallel({}) in a 1-rank process).
    """
    from msa_train.model.builder import build_model
    from msa_train.model.transformer_config import build_transformer_config

    config = build_transformer_config(
        model_cfg, attn_cfg, {}, torch.float32,
        perform_initialization=False, use_cpu_initialization=True,
    )
    with torch.device("meta"):
        return build_model(config)
