"""import-hf, export-hf, then stock transformers (no remote code) gives the original's logits;
the tensors come back bit for bit."""

import json
import os

import pytest
import torch

from msa_train.convert.exporter import export_hf
from msa_train.convert.families.base import ConversionError
from msa_train.convert.importer import import_hf
from tests.convert.helpers import LLAMA3_ROPE, attention_file, make_hf_model, rel_err

NO_MSA = "mode: dense\nblock_size: 4\ntopk: 3\nindex_dim: 8\nlayer_ids: []\n"

CASES = {
    "llama_rope_scaled_tied": ("llama", dict(rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True)),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", dict(num_key_value_heads=6)),
    "mistral": ("mistral", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "mixtral": ("mixtral", {}),
}


def _roundtrip(tmp_path, family, overrides, attention_yaml=NO_MSA, **export_kw):
    import transformers as tf

    hf, hf_dir = make_hf_model(tmp_path, family, **overrides)
    conv = str(tmp_path / "conv")
    import_hf(hf_dir, conv, attention=attention_file(tmp_path, attention_yaml), dtype="fp32",
              progress=False)
    out = str(tmp_path / "export")
    report = export_hf(conv, out, progress=False, **export_kw)
    back = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                   attn_implementation="eager").eval()
    return hf, back, report, out


@pytest.mark.parametrize("case", sorted(CASES))
def test_roundtrip_with_stock_transformers(case, tmp_path, megatron_1rank):
    family, overrides = CASES[case]
    hf, back, report, out = _roundtrip(tmp_path, family, overrides)
    assert not report["msa"] and type(back) is type(hf)
    assert not os.path.exists(os.path.join(out, "modeling_msa.py"))
    original = hf.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    tokens = torch.randint(0, hf.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, expected = back(tokens).logits, hf(tokens).logits
    assert rel_err(got, expected) <= 1e-6, rel_err(got, expected)


def test_no_msa_drops_the_index_branch(tmp_path, megatron_1rank):
    # Imported with MSA layers (fresh index branch): --no-msa exports the stock architecture.
    hf, back, report, out = _roundtrip(
        tmp_path, "llama", {}, "block_size: 4\ntopk: 3\nindex_dim: 8\ndense_first_layers: 1\n",
        no_msa=True)
    assert report["architecture"] == "LlamaForCausalLM"
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in cfg


def test_refuses_unknown_architecture(tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConversionError, match="model_type='gpt2'"):
        import_hf(str(hf_dir), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_shape_mismatch_naming_the_key(tmp_path, megatron_1rank):
    from safetensors.torch import load_file, save_file

    _, hf_dir = make_hf_model(tmp_path, "llama")
    path = os.path.join(hf_dir, "model.safetensors")
    state = load_file(path)
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:-1]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        import_hf(hf_dir, str(tmp_path / "out"), attention=attention_file(tmp_path), progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".msa-convert")]


def test_refuses_unused_tensor(tmp_path, megatron_1rank):
    from safetensors.torch import load_file, save_file

    _, hf_dir = make_hf_model(tmp_path, "qwen3")
    path = os.path.join(hf_dir, "model.safetensors")
    state = load_file(path)
    state["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(40)
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.self_attn\.o_proj\.bias is not used"):
        import_hf(hf_dir, str(tmp_path / "out"), attention=attention_file(tmp_path), progress=False)
