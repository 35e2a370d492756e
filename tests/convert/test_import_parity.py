"""import-hf, then the Megatron forward's logits equal the Hugging Face model's (fp32) on a
sequence shorter than topk x block_size (MSA equals dense there)."""

import pytest
import torch

from msa_train.convert.importer import import_hf
from tests.convert.helpers import (LLAMA3_ROPE, attention_file, make_hf_model, megatron_logits,
                                   megatron_model_from, rel_err)

SEQ = 11  # < topk (3) x block_size (4)

CASES = {
    # GQA 2, untied, Llama 3 rope scaling
    "llama_gqa2_rope_scaled": ("llama", dict(rope_scaling=LLAMA3_ROPE)),
    # GQA 1 (MHA), tied
    "llama_mha_tied": ("llama", dict(num_key_value_heads=6, tie_word_embeddings=True)),
    # GQA 3, q/k/v biases, tied (Qwen2.5 small models tie)
    "qwen2_bias_tied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=40,
                                      tie_word_embeddings=True)),
    "qwen3_qknorm_gqa3": ("qwen3", dict(num_key_value_heads=2)),
    "mistral": ("mistral", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen3_moe": ("qwen3_moe", {}),
    "mixtral": ("mixtral", dict(num_key_value_heads=2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_matches_hf_logits(case, tmp_path, megatron_1rank):
    family, overrides = CASES[case]
    hf, hf_dir = make_hf_model(tmp_path, family, **overrides)
    out = tmp_path / "converted"
    manifest = import_hf(hf_dir, str(out), attention=attention_file(tmp_path), dtype="fp32",
                         progress=False)
    assert manifest["family"] == family
    assert manifest["fresh"], "dense source: the index branch starts fresh"
    assert manifest["tokenizer"] is None  # generation_config.json alone is not a tokenizer
    model = megatron_model_from(str(out), mode="sparse")
    tokens = torch.randint(0, hf.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits.float()
    got = megatron_logits(model, tokens)[..., : hf.config.vocab_size]
    assert rel_err(got, expected) <= 1e-4, rel_err(got, expected)
