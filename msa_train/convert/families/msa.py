"""The exported MSA model (MSAForCausalLM, trust_remote_code): every feature of the other
tables in one layout (Qwen3-MoE's expert names), plus the index branch named as MiniMax-M3 names it."""

from msa_train.convert.families.base import (ATTENTION, DENSE_MLP, EMBEDDING, INDEX_BRANCH,
                                             QK_NORM, QKV_BIAS, ConversionError, Family)
from msa_train.convert.families.common import llama_like_to_hf, refuse_if
from msa_train.convert.families.qwen3_moe import MOE


def to_model(cfg):
    raise ConversionError("import-hf of an exported MSAForCausalLM is not supported: continue "
                          "from the msa-train checkpoint it was exported from")


def to_hf(m):
    refuse_if(m.normalization != "RMSNorm", "the MSA export supports RMSNorm models only")
    refuse_if(not m.gated_linear_unit, "the MSA export supports SwiGLU models only")
    refuse_if(m.position_embedding_type != "rope", "the MSA export supports RoPE models only")
    refuse_if(m.num_moe_experts is not None and m.moe_shared_expert_intermediate_size is not None,
              "the MSA export does not support shared experts yet")
    refuse_if(m.num_moe_experts is not None and m.moe_router_score_function != "softmax",
              "the MSA export supports softmax routing only")
    refuse_if(m.norm_zero_centered or m.activation != "swiglu",
              "the MSA export supports plain RMSNorm and SwiGLU only (set model.hf_family="
              "minimax_m3 to export a MiniMax-M3-shaped model in M3's layout)")
    out = dict(llama_like_to_hf(m), model_type="msa", partial_rotary_factor=m.rotary_percent,
               attention_qkv_bias=m.add_qkv_bias, qk_norm=m.qk_layernorm,
               source_family=m.hf_family)
    if m.num_moe_experts is not None:
        out.update(num_experts=m.num_moe_experts, num_experts_per_tok=m.moe_router_topk,
                   moe_intermediate_size=m.moe_ffn_hidden_size,
                   norm_topk_prob=not (m.moe_router_pre_softmax or m.moe_router_topk == 1),
                   mlp_layer_types=["moe" if x else "dense" for x in m.moe_layout()])
    else:
        out.update(num_experts=0, mlp_layer_types=["dense"] * m.num_layers)
    return out


FAMILY = Family(
    name="msa", model_types=("msa",), architecture="MSAForCausalLM",
    rules=EMBEDDING + ATTENTION + QKV_BIAS + QK_NORM + DENSE_MLP + MOE + INDEX_BRANCH,
    to_model=to_model, to_hf=to_hf,
)
