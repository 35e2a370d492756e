"""config.json -> ModelConfig per family, refusals with clear messages, ModelConfig -> config.json."""


import pytest

from msa_train.convert.families import FAMILIES, family_for_config, family_for_model
from msa_train.convert.families.base import ConversionError
from msa_train.convert.importer import model_config_from_hf

LLAMA32_1B = {
    "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "tie_word_embeddings": True, "hidden_act": "silu",
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


def test_llama32_1b_config():
    m = model_config_from_hf(LLAMA32_1B)
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.kv_channels) == \
        (16, 2048, 32, 8, 64)
    assert m.rope_scaling == "llama3" and m.rope_scaling_factor == 32.0
    assert not m.untie_embeddings_and_output_weights and m.rotary_base == 500000
    assert m.hf_family == "llama" and family_for_model(m).name == "llama"


def test_qwen3_moe_layout_and_routing():
    cfg = {"model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "vocab_size": 100, "num_experts": 8, "num_experts_per_tok": 2,
           "moe_intermediate_size": 24, "mlp_only_layers": [0], "norm_topk_prob": False}
    m = model_config_from_hf(cfg)
    assert m.moe_layout() == [0, 1, 1, 1] and m.qk_layernorm and m.moe_router_pre_softmax


@pytest.mark.parametrize("patch,message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
    ({"rope_scaling": dict(LLAMA32_1B["rope_scaling"], high_freq_factor=2.0)}, "high_freq_factor"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias=true"),
])
def test_refusals_name_the_field(patch, message):
    with pytest.raises(ConversionError, match=message):
        model_config_from_hf(dict(LLAMA32_1B, **patch))


def test_mistral_sliding_window_refused():
    cfg = dict(LLAMA32_1B, model_type="mistral", rope_scaling=None, sliding_window=4096)
    with pytest.raises(ConversionError, match="sliding_window=4096"):
        model_config_from_hf(cfg)


def test_unknown_family():
    with pytest.raises(ConversionError, match="model_type='gpt_neox'"):
        family_for_config({"model_type": "gpt_neox"})


# The stock transformers families (MiniMax-M3's round trip: tests/convert/test_m3_convert.py).
@pytest.mark.parametrize("name", sorted(set(FAMILIES) - {"minimax_m3"}))
def test_config_round_trip(name):
    """family.to_hf then family.to_model gives the same ModelConfig fields."""
    from tests.convert.helpers import hf_config

    cfg = hf_config(name).to_dict()
    m = model_config_from_hf(cfg)
    again = model_config_from_hf(dict(FAMILIES[name].to_hf(m)))
    assert again == m
