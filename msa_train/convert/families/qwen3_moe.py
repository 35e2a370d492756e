"""Qwen3-MoE (Qwen3MoeForCausalLM): qk-norm, softmax top-k routing, per-expert SwiGLU."""

from msa_train.convert.families.base import (ATTENTION, DENSE_MLP, EMBEDDING, INDEX_BRANCH, L,
                                             H, QK_NORM, Family, Rule)
from msa_train.convert.families.common import (llama_like, llama_like_to_hf, moe_fields,
                                               no_sliding_window, refuse_if)

MOE = (
    Rule(L + "mlp.router.weight", (H + "mlp.gate.weight",), when="moe"),
    Rule(L + "mlp.experts.experts.linear_fc1.weight",
         (H + "mlp.experts.{e}.gate_proj.weight", H + "mlp.experts.{e}.up_proj.weight"),
         kind="experts_gate_up", when="moe"),
    Rule(L + "mlp.experts.experts.linear_fc2.weight", (H + "mlp.experts.{e}.down_proj.weight",),
         kind="experts", when="moe"),
)


def moe_layout(cfg):
    """A layer is MoE unless listed in mlp_only_layers, every decoder_sparse_step-th layer."""
    n = int(cfg["num_hidden_layers"])
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    dense = set(cfg.get("mlp_only_layers") or [])
    return [0 if (i in dense or (i + 1) % step != 0) else 1 for i in range(n)]


def to_model(cfg):
    no_sliding_window(cfg)
    refuse_if(bool(cfg.get("attention_bias")),
              "config.json attention_bias=true (biases on q/k/v/o) is not supported")
    out = dict(llama_like(cfg), qk_layernorm=True)
    out.update(moe_fields(cfg, "num_experts", "moe_intermediate_size",
                          bool(cfg.get("norm_topk_prob", True)), moe_layout(cfg)))
    return out


def to_hf(m):
    layout = m.moe_layout()
    return dict(llama_like_to_hf(m), model_type="qwen3_moe", attention_bias=False,
                use_sliding_window=False, num_experts=m.num_moe_experts,
                num_experts_per_tok=m.moe_router_topk, moe_intermediate_size=m.moe_ffn_hidden_size,
                norm_topk_prob=not m.moe_router_pre_softmax, decoder_sparse_step=1,
                mlp_only_layers=[i for i, x in enumerate(layout) if not x],
                router_aux_loss_coef=m.moe_aux_loss_coeff, output_router_logits=False)


FAMILY = Family(
    name="qwen3_moe", model_types=("qwen3_moe",), architecture="Qwen3MoeForCausalLM",
    rules=EMBEDDING + ATTENTION + QK_NORM + DENSE_MLP + MOE + INDEX_BRANCH, to_model=to_model,
    to_hf=to_hf,
)
