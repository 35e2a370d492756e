"""Qwen3 (Qwen3ForCausalLM): per-head RMSNorm on q and k (qk-norm)."""

from msa_train.convert.families.base import (ATTENTION, DENSE_MLP, EMBEDDING, INDEX_BRANCH,
                                             QK_NORM, Family)
from msa_train.convert.families.common import (llama_like, llama_like_to_hf, no_sliding_window,
                                               refuse_if)


def to_model(cfg):
    no_sliding_window(cfg)
    refuse_if(bool(cfg.get("attention_bias")),
              "config.json attention_bias=true (biases on q/k/v/o) is not supported")
    return dict(llama_like(cfg), qk_layernorm=True)


def to_hf(m):
    return dict(llama_like_to_hf(m), model_type="qwen3", attention_bias=False,
                use_sliding_window=False)


FAMILY = Family(
    name="qwen3", model_types=("qwen3",), architecture="Qwen3ForCausalLM",
    rules=EMBEDDING + ATTENTION + QK_NORM + DENSE_MLP + INDEX_BRANCH, to_model=to_model,
    to_hf=to_hf,
)
