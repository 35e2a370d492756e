"""Model side of msa-train: MSA attention in Megatron-Core, configs, specs, KL tracking, counting.

Public API (docs/ARCHITECTURE.md): ModelConfig, AttentionConfig, build_transformer_config,
build_model, set_msa_mode, kl_tracker, set_kl_loss_scale / kl_loss_scale, compute_recall,
request_recall / get_recall_metrics, and the counting functions of msa_train.model.flops.
"""

from msa_train.model import kl_tracker, recall
from msa_train.model.attention import MSACoreAttention, MSASelfAttention, set_msa_mode
from msa_train.model.builder import build_model, index_parameters
from msa_train.model.config import AttentionConfig, ModelConfig
from msa_train.model.flops import count_parameters, flops_breakdown, flops_per_token
from msa_train.model.kl_scaler import KLAutoScaler, kl_loss_scale, set_kl_loss_scale
from msa_train.model.recall import compute_recall, get_recall_metrics, request_recall
from msa_train.model.transformer_config import (
    MSATransformerConfig,
    build_transformer_config,
)

__all__ = [
    "ModelConfig", "AttentionConfig", "MSATransformerConfig", "build_transformer_config",
    "build_model", "set_msa_mode", "index_parameters", "kl_tracker", "recall", "KLAutoScaler",
    "kl_loss_scale", "set_kl_loss_scale", "compute_recall", "request_recall",
    "get_recall_metrics", "MSACoreAttention", "MSASelfAttention", "count_parameters",
    "flops_per_token", "flops_breakdown",
]
