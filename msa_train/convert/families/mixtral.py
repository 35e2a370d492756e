"""Mixtral (MixtralForCausalLM): every layer MoE, experts w1 (gate) / w3 (up) / w2 (down)."""

from msa_train.convert.families.base import (ATTENTION, EMBEDDING, INDEX_BRANCH, L, H, Family,
                                             Rule)
from msa_train.convert.families.common import (llama_like, llama_like_to_hf, moe_fields,
                                               no_sliding_window)

MOE = (
    Rule(L + "mlp.router.weight", (H + "block_sparse_moe.gate.weight",), when="moe"),
    Rule(L + "mlp.experts.experts.linear_fc1.weight",
         (H + "block_sparse_moe.experts.{e}.w1.weight", H + "block_sparse_moe.experts.{e}.w3.weight"),
         kind="experts_gate_up", when="moe"),
    Rule(L + "mlp.experts.experts.linear_fc2.weight", (H + "block_sparse_moe.experts.{e}.w2.weight",),
         kind="experts", when="moe"),
)


def to_model(cfg):
    no_sliding_window(cfg)
    out = llama_like(cfg)
    out.update(moe_fields(cfg, "num_local_experts", "intermediate_size", True,
                          [1] * int(cfg["num_hidden_layers"])))
    return out


def to_hf(m):
    return dict(llama_like_to_hf(m), model_type="mixtral", sliding_window=None,
                num_local_experts=m.num_moe_experts, num_experts_per_tok=m.moe_router_topk,
                intermediate_size=m.moe_ffn_hidden_size, router_aux_loss_coef=m.moe_aux_loss_coeff,
                output_router_logits=False)


FAMILY = Family(
    name="mixtral", model_types=("mixtral",), architecture="MixtralForCausalLM",
    rules=EMBEDDING + ATTENTION + MOE + INDEX_BRANCH, to_model=to_model, to_hf=to_hf,
)
