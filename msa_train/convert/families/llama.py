"""Llama 2 / 3.x (LlamaForCausalLM), including Llama 3's RoPE scaling."""

from msa_train.convert.families.base import ATTENTION, DENSE_MLP, EMBEDDING, INDEX_BRANCH, Family
from msa_train.convert.families.common import llama_like, llama_like_to_hf, refuse_if


def to_model(cfg):
    refuse_if(bool(cfg.get("attention_bias")),
              "config.json attention_bias=true (biases on q/k/v/o) is not supported")
    return llama_like(cfg)


def to_hf(m):
    return dict(llama_like_to_hf(m), model_type="llama", attention_bias=False, mlp_bias=False)


FAMILY = Family(
    name="llama", model_types=("llama",), architecture="LlamaForCausalLM",
    rules=EMBEDDING + ATTENTION + DENSE_MLP + INDEX_BRANCH, to_model=to_model, to_hf=to_hf,
)
