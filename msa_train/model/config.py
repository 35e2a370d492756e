"""Model and attention configs: plain dataclasses, usable as Hydra structured-config schemas.

Only primitive, list and Optional fields, so configs/model/*.yaml and configs/attention/*.yaml
validate against them at compose time. ``build_transformer_config`` turns them into Megatron's
TransformerConfig (msa_train.model.transformer_config).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

MSA_MODES = ("dense", "sparse")
LM_LOSS_IMPLS = ("megatron", "chunked", "liger")  # model.lm_loss (msa_train.model.lm_loss)
KERNEL_BACKENDS = ("auto", "triton", "reference")  # attention.kernels (msa_kernels backend=)


@dataclass
class ModelConfig:
    """Backbone sizes. Field names follow Megatron where one exists."""

    name: str = "tiny"
    num_layers: int = 4
    hidden_size: int = 64
    ffn_hidden_size: int = 128  # dense-FFN layers (first-k-dense and non-MoE models)
    num_attention_heads: int = 4
    num_query_groups: int = 2  # GQA KV heads
    kv_channels: int = 16  # head dim
    vocab_size: int = 256
    max_position_embeddings: int = 4096
    position_embedding_type: str = "rope"  # rope | none
    rotary_base: int = 10000
    rotary_percent: float = 1.0  # 0.5 = partial RoPE on half the head dim (109B: 64 of 128)
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-6
    init_method_std: float = 0.02
    gated_linear_unit: bool = True  # SwiGLU
    qk_layernorm: bool = False
    untie_embeddings_and_output_weights: bool = True
    add_qkv_bias: bool = False  # biases on the q/k/v projections only (Qwen2 / Qwen2.5)
    # RoPE frequency scaling: None, "llama3" (Llama 3.1+: low/high frequency factors 1 / 4 over
    # 8192 original positions) or "linear" (positions divided by the factor).
    rope_scaling: Optional[str] = None
    rope_scaling_factor: float = 1.0
    # Hugging Face architecture family this model came from / exports to (msa-convert), e.g.
    # "llama", "qwen2", "qwen3", "mistral", "qwen3_moe", "mixtral"; None = not converted.
    hf_family: Optional[str] = None
    # MoE (num_moe_experts None = dense FFN everywhere).
    num_moe_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None  # per routed expert
    moe_shared_expert_intermediate_size: Optional[int] = None  # total size of the shared expert(s)
    moe_first_k_dense: int = 0  # first k layers use the dense FFN (109B: 3)
    moe_layer_freq: Optional[List[int]] = None  # explicit 0/1 per layer; overrides moe_first_k_dense
    moe_router_score_function: str = "softmax"  # softmax | sigmoid
    moe_router_pre_softmax: bool = False
    moe_router_load_balancing_type: str = "aux_loss"
    moe_aux_loss_coeff: float = 1e-3
    moe_token_dispatcher_type: str = "alltoall"
    # Speed switches (same math, see docs/THROUGHPUT.md). moe_grouped_gemm: routed experts as two
    # torch._grouped_mm GEMMs (msa_train.model.experts) instead of one GEMM per expert.
    moe_grouped_gemm: bool = False
    # fused_activation: Megatron's own torch.compile fusions of SwiGLU (with the MoE routing
    # weight) and bias-dropout-add, instead of separate elementwise kernels (activation=swiglu).
    fused_activation: bool = False
    # lm_loss: megatron (materialised logits) | chunked (pure torch, any TP) | liger (liger-kernel
    # fused linear cross-entropy, CUDA, TP=1); msa_train.model.lm_loss.
    lm_loss: str = "megatron"
    # Sigmoid routing extras (DeepSeek-V3 / MiniMax-M3): a per-expert score-correction bias added
    # for the top-k choice only (updated by load, not by gradients), and a scale on the routed
    # weights after their renormalisation (M3: 2.0).
    moe_router_enable_expert_bias: bool = False
    moe_router_bias_update_rate: float = 1e-3
    moe_router_topk_scaling_factor: Optional[float] = None
    # Every RMSNorm weight (hidden, q/k and index norms) stored as an offset from one (Gemma-style,
    # MiniMax-M3): the norm multiplies by 1 + w, and w starts at zero.
    norm_zero_centered: bool = False
    # Gated MLP activation: "swiglu" = silu(gate) * up; "swigluoai" = the clamped GPT-OSS form
    # (MiniMax-M3): gate clamped above at activation_clamp, up clamped to +-activation_clamp,
    # gate * sigmoid(1.702 gate) * (up + 1). Dense MLPs, routed and shared experts alike.
    activation: str = "swiglu"
    activation_clamp: float = 7.0

    def __post_init__(self) -> None:
        validate_model_config(self)

    def moe_layout(self) -> List[int]:
        """0/1 per layer: 1 = MoE FFN."""
        if self.num_moe_experts is None:
            return [0] * self.num_layers
        if self.moe_layer_freq is not None:
            return list(self.moe_layer_freq)
        return [0] * self.moe_first_k_dense + [1] * (self.num_layers - self.moe_first_k_dense)


@dataclass
class AttentionConfig:
    """MSA fields (msa_* in the TransformerConfig). Defaults are the paper's."""

    mode: str = "dense"  # dense = stage 1 (indexer warmup), sparse = stage 2
    block_size: int = 128
    topk: int = 16  # blocks per query and group, local block included
    index_dim: int = 128
    kl_coeff: float = 1.0  # lambda; the paper does not disclose it
    # Which layers are MSA. Default: the first `dense_first_layers` are full attention, the rest MSA
    # (as MiniMax-M3). `layer_map` (0/1 per layer) or `layer_ids` (0-based MSA layer indices)
    # override it; give at most one of the two.
    dense_first_layers: int = 3
    layer_map: Optional[List[int]] = None
    layer_ids: Optional[List[int]] = None
    force_sink: bool = False  # ablation C.2
    local_window: int = 0  # ablation C.2: force the w blocks before the local one
    index_norm: bool = False  # per-head RMSNorm on q_idx / k_idx (MiniMax-M3)
    index_rope: bool = False  # main branch's partial RoPE on q_idx / k_idx (MiniMax-M3)
    # Stop-gradient on the index branch's input (the paper's sg(X)): the KL trains only the index
    # projections. false = ablation: the KL's gradient also reaches the backbone through X.
    index_stop_grad: bool = True
    # Paper Fig. 3 recall metrics are computed on demand (how often: logging.recall_interval) on
    # at most `recall_num_queries` sampled query tokens per layer.
    recall_num_queries: int = 256
    deterministic: bool = False
    # msa_kernels backend: auto (Triton on CUDA, the PyTorch reference on CPU) | triton | reference.
    kernels: str = "auto"

    def __post_init__(self) -> None:
        validate_attention_config(self)

    def layer_mask(self, num_layers: int) -> List[int]:
        """0/1 per layer: 1 = MSA (index branch + sparse/dense MSA attention)."""
        if self.layer_map is not None:
            if len(self.layer_map) != num_layers:
                raise ValueError(
                    f"attention.layer_map has {len(self.layer_map)} entries but the model has "
                    f"{num_layers} layers"
                )
            return [int(x) for x in self.layer_map]
        if self.layer_ids is not None:
            bad = [i for i in self.layer_ids if not 0 <= int(i) < num_layers]
            if bad:
                raise ValueError(
                    f"attention.layer_ids {bad} out of range for a {num_layers}-layer model"
                )
            ids = {int(i) for i in self.layer_ids}
            return [1 if i in ids else 0 for i in range(num_layers)]
        k = min(self.dense_first_layers, num_layers)
        return [0] * k + [1] * (num_layers - k)


def _positive(cfg, name: str, section: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{section}.{name} must be a positive int, got {value!r}")


def validate_model_config(cfg: ModelConfig) -> None:
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_query_groups", "kv_channels", "vocab_size", "max_position_embeddings"):
        _positive(cfg, name, "model")
    if cfg.num_attention_heads % cfg.num_query_groups != 0:
        raise ValueError(
            f"model.num_attention_heads ({cfg.num_attention_heads}) must be a multiple of "
            f"model.num_query_groups ({cfg.num_query_groups})"
        )
    if not 0.0 < cfg.rotary_percent <= 1.0:
        raise ValueError(f"model.rotary_percent must be in (0, 1], got {cfg.rotary_percent}")
    if cfg.position_embedding_type not in ("rope", "none"):
        raise ValueError(
            f"model.position_embedding_type must be 'rope' or 'none', got "
            f"{cfg.position_embedding_type!r}"
        )
    if cfg.rope_scaling not in (None, "llama3", "linear"):
        raise ValueError(
            f"model.rope_scaling must be null, 'llama3' or 'linear', got {cfg.rope_scaling!r}")
    if cfg.rope_scaling is not None and not cfg.rope_scaling_factor > 0:
        raise ValueError(f"model.rope_scaling_factor must be > 0, got {cfg.rope_scaling_factor}")
    if cfg.lm_loss not in LM_LOSS_IMPLS:
        raise ValueError(f"model.lm_loss must be one of {LM_LOSS_IMPLS}, got {cfg.lm_loss!r}")
    if cfg.normalization not in ("RMSNorm", "LayerNorm"):
        raise ValueError(f"model.normalization must be RMSNorm or LayerNorm, got {cfg.normalization!r}")
    if cfg.activation not in ("swiglu", "swigluoai"):
        raise ValueError(f"model.activation must be 'swiglu' or 'swigluoai', got {cfg.activation!r}")
    if cfg.activation == "swigluoai" and not cfg.gated_linear_unit:
        raise ValueError("model.activation=swigluoai is a gated activation: set "
                         "model.gated_linear_unit=true")
    if not cfg.activation_clamp > 0:
        raise ValueError(f"model.activation_clamp must be > 0, got {cfg.activation_clamp}")
    if cfg.num_moe_experts is not None:
        _positive(cfg, "num_moe_experts", "model")
        _positive(cfg, "moe_router_topk", "model")
        if cfg.moe_router_topk > cfg.num_moe_experts:
            raise ValueError(
                f"model.moe_router_topk ({cfg.moe_router_topk}) exceeds model.num_moe_experts "
                f"({cfg.num_moe_experts})"
            )
        if cfg.moe_ffn_hidden_size is None:
            raise ValueError("model.moe_ffn_hidden_size is required when num_moe_experts is set")
        if cfg.moe_layer_freq is not None:
            if len(cfg.moe_layer_freq) != cfg.num_layers or set(cfg.moe_layer_freq) - {0, 1}:
                raise ValueError(
                    f"model.moe_layer_freq must be a 0/1 list of length num_layers "
                    f"({cfg.num_layers}), got {cfg.moe_layer_freq}"
                )
        elif not 0 <= cfg.moe_first_k_dense <= cfg.num_layers:
            raise ValueError(
                f"model.moe_first_k_dense must be in [0, num_layers], got {cfg.moe_first_k_dense}"
            )
        if cfg.moe_router_enable_expert_bias and cfg.moe_router_score_function != "sigmoid":
            raise ValueError("model.moe_router_enable_expert_bias needs "
                             "model.moe_router_score_function=sigmoid")


def validate_attention_config(cfg: AttentionConfig) -> None:
    if cfg.mode not in MSA_MODES:
        raise ValueError(f"attention.mode must be one of {MSA_MODES}, got {cfg.mode!r}")
    for name in ("block_size", "topk", "index_dim"):
        _positive(cfg, name, "attention")
    if cfg.index_dim % 2 != 0 and cfg.index_rope:
        raise ValueError(f"attention.index_dim must be even with index_rope, got {cfg.index_dim}")
    if cfg.kl_coeff < 0:
        raise ValueError(f"attention.kl_coeff must be >= 0, got {cfg.kl_coeff}")
    if cfg.local_window < 0:
        raise ValueError(f"attention.local_window must be >= 0, got {cfg.local_window}")
    if cfg.dense_first_layers < 0:
        raise ValueError(
            f"attention.dense_first_layers must be >= 0, got {cfg.dense_first_layers}"
        )
    if cfg.layer_map is not None and cfg.layer_ids is not None:
        raise ValueError("give attention.layer_map or attention.layer_ids, not both")
    if cfg.layer_map is not None and set(int(x) for x in cfg.layer_map) - {0, 1}:
        raise ValueError(f"attention.layer_map must hold only 0/1, got {cfg.layer_map}")
    forced = int(cfg.force_sink) + cfg.local_window + 1
    if forced > cfg.topk:
        raise ValueError(
            f"attention.topk ({cfg.topk}) must leave room for the forced blocks: local + "
            f"local_window ({cfg.local_window}) + sink ({int(cfg.force_sink)}) = {forced}"
        )
    if cfg.kernels not in KERNEL_BACKENDS:
        raise ValueError(f"attention.kernels must be one of {KERNEL_BACKENDS}, got {cfg.kernels!r}")
    if cfg.recall_num_queries < 1:
        raise ValueError(
            "attention.recall_num_queries must be >= 1"
        )
