"""MSATransformerConfig: Megatron's TransformerConfig plus the documented msa_* fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from msa_train.model.config import MSA_MODES, AttentionConfig, ModelConfig
from msa_train.cfg_access import cfg_get as _get, parallel_sizes


@dataclass
class MSATransformerConfig(TransformerConfig):
    """TransformerConfig + MiniMax Sparse Attention fields (docs/MSA.md).

    msa_layer_map: 0/1 per layer (1 = MSA layer with an index branch); resolved from
    AttentionConfig. msa_mode is the runtime stage; switch it with ``set_msa_mode``.
    """

    msa_mode: str = "dense"
    msa_block_size: int = 128
    msa_topk: int = 16
    msa_index_dim: int = 128
    msa_kl_coeff: float = 1.0
    msa_layer_map: Optional[List[int]] = None
    msa_force_sink: bool = False
    msa_local_window: int = 0
    msa_index_norm: bool = False
    msa_index_rope: bool = False
    msa_index_stop_grad: bool = True
    msa_recall_num_queries: int = 256
    msa_deterministic: bool = False
    msa_kernels: str = "auto"  # AttentionConfig.kernels: the msa_kernels backend
    msa_grouped_experts: bool = False  # ModelConfig.moe_grouped_gemm (msa_train.model.experts)
    msa_lm_loss: str = "megatron"  # ModelConfig.lm_loss (msa_train.model.lm_loss)
    # GPTModel constructor arguments that are not TransformerConfig fields, kept here so that
    # build_model(config) needs nothing else.
    gpt_vocab_size: int = 256
    gpt_max_position_embeddings: int = 4096
    gpt_position_embedding_type: str = "rope"
    gpt_rotary_base: int = 10000
    gpt_rotary_percent: float = 1.0
    gpt_share_embeddings: bool = False
    gpt_rope_scaling: Optional[str] = None  # None | "llama3" | "linear" (ModelConfig.rope_scaling)
    gpt_rope_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.msa_mode not in MSA_MODES:
            raise ValueError(f"msa_mode must be one of {MSA_MODES}, got {self.msa_mode!r}")
        if self.msa_topk < 1:
            raise ValueError(f"msa_topk (attention.topk) must be >= 1, got {self.msa_topk}")
        if self.msa_block_size < 1:
            raise ValueError(
                f"msa_block_size (attention.block_size) must be >= 1, got {self.msa_block_size}"
            )
        if self.calculate_per_token_loss:
            # kl_loss_scale follows Megatron's per-micro-batch averaging only.
            raise ValueError("calculate_per_token_loss is not supported: the indexer-KL gradient "
                             "follows Megatron's per-micro-batch loss averaging")
        if self.msa_layer_map is None:
            self.msa_layer_map = [0] * self.num_layers
        if len(self.msa_layer_map) != self.num_layers:
            raise ValueError(
                f"msa_layer_map has {len(self.msa_layer_map)} entries, expected num_layers "
                f"({self.num_layers})"
            )
        tp = self.tensor_model_parallel_size
        if any(self.msa_layer_map) and self.num_query_groups % tp != 0:
            # Index-query heads are sharded with their GQA groups; a group split over ranks
            # would need its index head replicated and re-sliced.
            raise ValueError(
                f"model.num_query_groups ({self.num_query_groups}) must be divisible by "
                f"parallel.tp ({tp}) for MSA layers"
            )

    def is_msa_layer(self, layer_number: int) -> bool:
        """layer_number is Megatron's global 1-based layer number."""
        return bool(self.msa_layer_map[layer_number - 1])


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _resolve_dtype(params_dtype: Any) -> torch.dtype:
    if isinstance(params_dtype, torch.dtype):
        return params_dtype
    if isinstance(params_dtype, str) and params_dtype in _DTYPES:
        return _DTYPES[params_dtype]
    raise ValueError(f"params_dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {params_dtype!r}")


def _activation_func(m: ModelConfig):
    """swigluoai = Megatron's quick_gelu GLU (x * sigmoid(1.702 x)) with the clamp and the up + 1
    offset (glu_linear_offset / activation_func_clamp_value, set by the caller)."""
    if m.activation == "swigluoai":
        from megatron.core.fusions.fused_bias_geglu import quick_gelu

        return quick_gelu
    return F.silu if m.gated_linear_unit else F.gelu


def build_transformer_config(
    model_cfg: ModelConfig,
    attn_cfg: AttentionConfig,
    parallel: Any = None,
    params_dtype: Any = torch.float32,
    **overrides: Any,
) -> MSATransformerConfig:
    """ModelConfig + AttentionConfig + parallel sizes -> MSATransformerConfig.

    parallel: dict-like or object with tp, pp, cp, ep, etp (optional), vpp (optional),
    sequence_parallel. overrides: any TransformerConfig field (e.g. recompute settings).
    """
    tp, pp, cp, ep, etp, vpp = parallel_sizes(parallel)
    sp = bool(_get(parallel, "sequence_parallel", tp > 1))
    dtype = _resolve_dtype(params_dtype)
    m = model_cfg
    if m.num_attention_heads % tp != 0:
        raise ValueError(
            f"parallel.tp ({tp}) must divide model.num_attention_heads ({m.num_attention_heads})"
        )
    if m.num_query_groups % tp != 0 and tp % m.num_query_groups != 0:
        raise ValueError(
            f"parallel.tp ({tp}) and model.num_query_groups ({m.num_query_groups}) must divide "
            "one another"
        )
    if m.num_moe_experts is not None:
        if m.num_moe_experts % ep != 0:
            raise ValueError(
                f"parallel.ep ({ep}) must divide model.num_moe_experts ({m.num_moe_experts})"
            )
        if tp > 1 and not sp:
            raise ValueError("MoE with parallel.tp > 1 needs parallel.sequence_parallel=true")
    elif ep != 1:
        raise ValueError(f"parallel.ep={ep} needs an MoE model (model.num_moe_experts)")
    if m.num_layers % pp != 0:
        raise ValueError(f"parallel.pp ({pp}) must divide model.num_layers ({m.num_layers})")

    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        init_method_std=m.init_method_std,
        gated_linear_unit=m.gated_linear_unit,
        activation_func=_activation_func(m),
        qk_layernorm=m.qk_layernorm,
        add_qkv_bias=m.add_qkv_bias,
        rotary_interleaved=False,
        add_bias_linear=False,  # MoE + bias hits an in-place view error in Megatron
        attention_dropout=0.0,
        hidden_dropout=0.0,
        # Megatron fuses SwiGLU (its dense MLP has no fused swigluoai; GeLU fusion needs a bias).
        bias_activation_fusion=m.fused_activation and m.gated_linear_unit and m.activation == "swiglu",
        bias_dropout_fusion=m.fused_activation,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        sequence_parallel=sp and tp > 1,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
        # Per-layer checkpoint keys (Megatron's spelling): MSA and full-attention layers carry
        # different parameters, so stacking layers under one key fails to save. MoE models with
        # a first-k-dense list already get per-layer keys; this makes every model (dense twins,
        # non-MoE MSA models) use the same layout, so CPT from our dense checkpoints always loads.
        hetereogenous_dist_checkpoint=True,
        msa_mode=attn_cfg.mode,
        msa_block_size=attn_cfg.block_size,
        msa_topk=attn_cfg.topk,
        msa_index_dim=attn_cfg.index_dim,
        msa_kl_coeff=attn_cfg.kl_coeff,
        msa_layer_map=attn_cfg.layer_mask(m.num_layers),
        msa_force_sink=attn_cfg.force_sink,
        msa_local_window=attn_cfg.local_window,
        msa_index_norm=attn_cfg.index_norm,
        msa_index_rope=attn_cfg.index_rope,
        msa_index_stop_grad=attn_cfg.index_stop_grad,
        msa_recall_num_queries=attn_cfg.recall_num_queries,
        msa_deterministic=attn_cfg.deterministic,
        msa_kernels=attn_cfg.kernels,
        msa_grouped_experts=m.moe_grouped_gemm,
        msa_lm_loss=m.lm_loss,
        gpt_vocab_size=m.vocab_size,
        gpt_max_position_embeddings=m.max_position_embeddings,
        gpt_position_embedding_type=m.position_embedding_type,
        gpt_rotary_base=m.rotary_base,
        gpt_rotary_percent=m.rotary_percent,
        gpt_share_embeddings=not m.untie_embeddings_and_output_weights,
        gpt_rope_scaling=m.rope_scaling,
        gpt_rope_scaling_factor=m.rope_scaling_factor,
    )
    if m.activation == "swigluoai":
        kwargs.update(glu_linear_offset=1.0, activation_func_clamp_value=m.activation_clamp)
    if m.norm_zero_centered:
        kwargs.update(layernorm_zero_centered_gamma=True)
    if m.num_moe_experts is not None:
        kwargs.update(
            num_moe_experts=m.num_moe_experts,
            moe_router_topk=m.moe_router_topk,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
            moe_layer_freq=m.moe_layout(),
            moe_router_score_function=m.moe_router_score_function,
            # Megatron requires pre-softmax routing for top-1.
            moe_router_pre_softmax=m.moe_router_pre_softmax or m.moe_router_topk == 1,
            moe_router_load_balancing_type=m.moe_router_load_balancing_type,
            moe_aux_loss_coeff=m.moe_aux_loss_coeff,
            moe_token_dispatcher_type=m.moe_token_dispatcher_type,
            # Megatron's GroupedMLP needs the grouped_gemm extension; ours is msa_grouped_experts.
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
            moe_router_dtype="fp32",
        )
        if m.moe_router_enable_expert_bias:
            kwargs.update(moe_router_enable_expert_bias=True,
                          moe_router_bias_update_rate=m.moe_router_bias_update_rate)
        if m.moe_router_topk_scaling_factor is not None:
            kwargs.update(moe_router_topk_scaling_factor=m.moe_router_topk_scaling_factor)
    kwargs.update(overrides)
    return MSATransformerConfig(**kwargs)
