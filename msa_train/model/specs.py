"""ModuleSpecs of the MSA GPT decoder (Megatron-Core local modules + our attention and norms)."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import List, Optional

from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from msa_train.model.attention import MSACoreAttention, MSASelfAttention
from msa_train.model.experts import GroupedExperts
from msa_train.model.norm import SPNorm


def msa_layer_spec(config, moe: bool) -> ModuleSpec:
    """One decoder layer. Whether its attention has the index branch is read from
    config.msa_layer_map by MSACoreAttention (so PP/VPP slicing needs no extra bookkeeping)."""
    mlp = get_mlp_module_spec(
        use_te=False, num_experts=config.num_moe_experts if moe else None, moe_grouped_gemm=False
    )
    if moe and getattr(config, "msa_grouped_experts", False):
        mlp = _with_grouped_experts(mlp)
    qk_norm = SPNorm if config.qk_layernorm else IdentityOp
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=SPNorm,
            self_attention=ModuleSpec(
                module=MSASelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=MSACoreAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=SPNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _with_grouped_experts(moe_spec):
    """The MoE spec with GroupedExperts (SequentialMLP's parameters, grouped GEMMs) in place of
    SequentialMLP. megatron-core 0.16 spells the MoE layer as ModuleSpec(MoELayer, submodules=
    MoESubmodules(experts=ModuleSpec(SequentialMLP, ...))); 0.19 as functools.partial(MoELayer,
    submodules=MoESubmodules(experts=partial(SequentialMLP, submodules=...)))."""
    if isinstance(moe_spec, ModuleSpec):
        moe_spec.submodules.experts.module = GroupedExperts
        return moe_spec
    subs = moe_spec.keywords["submodules"]
    experts = subs.experts
    subs = dataclasses.replace(subs, experts=partial(GroupedExperts, *experts.args, **experts.keywords))
    return partial(moe_spec.func, *moe_spec.args, **{**moe_spec.keywords, "submodules": subs})


def moe_pattern(config) -> List[int]:
    if config.num_moe_experts is None:
        return [0] * config.num_layers
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    return list(freq)


def msa_block_spec(
    config, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None
) -> TransformerBlockSubmodules:
    """Decoder block spec holding only this pipeline stage's layers."""
    pattern = moe_pattern(config)
    specs = [msa_layer_spec(config, moe=bool(p)) for p in pattern]
    num_local = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(
        layer_specs=specs[offset : offset + num_local], layer_norm=SPNorm
    )
