"""Mistral (MistralForCausalLM): Llama's tensors; sliding-window configs are refused."""

from msa_train.convert.families.base import ATTENTION, DENSE_MLP, EMBEDDING, INDEX_BRANCH, Family
from msa_train.convert.families.common import llama_like, llama_like_to_hf, no_sliding_window


def to_model(cfg):
    no_sliding_window(cfg)
    return llama_like(cfg)


def to_hf(m):
    return dict(llama_like_to_hf(m), model_type="mistral", sliding_window=None)


FAMILY = Family(
    name="mistral", model_types=("mistral",), architecture="MistralForCausalLM",
    rules=EMBEDDING + ATTENTION + DENSE_MLP + INDEX_BRANCH, to_model=to_model, to_hf=to_hf,
)
