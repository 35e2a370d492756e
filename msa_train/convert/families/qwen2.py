"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM): biases on q/k/v."""

from msa_train.convert.families.base import (ATTENTION, DENSE_MLP, EMBEDDING, INDEX_BRANCH,
                                             QKV_BIAS, Family)
from msa_train.convert.families.common import llama_like, llama_like_to_hf, no_sliding_window


def to_model(cfg):
    no_sliding_window(cfg)
    # Qwen2's modeling code ignores config.json head_dim: hidden_size / num_attention_heads.
    cfg = dict(cfg, head_dim=None)
    return dict(llama_like(cfg), add_qkv_bias=True)


def to_hf(m):
    out = dict(llama_like_to_hf(m), model_type="qwen2", use_sliding_window=False)
    out.pop("head_dim")  # Qwen2 derives it from hidden_size / num_attention_heads
    return out


FAMILY = Family(
    name="qwen2", model_types=("qwen2",), architecture="Qwen2ForCausalLM",
    rules=EMBEDDING + ATTENTION + QKV_BIAS + DENSE_MLP + INDEX_BRANCH, to_model=to_model,
    to_hf=to_hf,
)
