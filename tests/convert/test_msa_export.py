"""A tiny MSA checkpoint trained by msa-train (both stages) exported with export-hf: the
transformers model (trust_remote_code, plain PyTorch) matches Megatron's sparse forward on
sequences >= 4 x topk x block_size, and greedy generate() with the KV + index-key caches equals
generation without caches."""

import json
import os

import pytest
import torch

from msa_train.convert.exporter import export_hf
from msa_train.convert.importer import import_hf
from tests.convert.helpers import attention_file, make_hf_model, megatron_sparse_from_save, rel_err
from tests.trainer.helpers import SMALL, run_train

pytestmark = pytest.mark.slow
BLOCK, TOPK = 4, 3
ATTN = f"block_size: {BLOCK}\ntopk: {TOPK}\nindex_dim: 8\ndense_first_layers: 1\n"
SEQ = 4 * TOPK * BLOCK + 5  # 53 tokens: 14 blocks, each query keeps at most 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory, megatron_1rank):
    """(save dir, run dir): Qwen3-MoE-shaped model (qk-norm, MoE), imported, trained 6 steps."""
    tmp = tmp_path_factory.mktemp("msa")
    _, hf_dir = make_hf_model(tmp, "qwen3_moe", vocab_size=300, num_hidden_layers=3,
                              mlp_only_layers=[0], num_key_value_heads=2)
    conv = tmp / "converted"
    import_hf(hf_dir, str(conv), attention=attention_file(tmp, ATTN), dtype="fp32", progress=False)
    save = tmp / "save"
    run_train(["experiment=cpt_from_hf", "data=stdlib", "stage=tiny", f"checkpoint.init_from={conv}",
               f"checkpoint.save={save}", *[a for a in SMALL if "seq_length" not in a],
               "train.seq_length=64"], str(tmp / "run"))
    return str(save), str(tmp / "run")


def test_hf_sparse_forward_and_cached_generation(trained, tmp_path):
    import transformers as tf

    save_dir, run_dir = trained
    out = str(tmp_path / "hf_msa")
    report = export_hf(run_dir, out, progress=False)  # a run dir: its run_config names the save dir
    assert report["msa"] and report["architecture"] == "MSAForCausalLM"
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["msa_layers"] == [0, 1, 1] and cfg["auto_map"]
    hf = tf.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()

    tokens = torch.randint(0, 257, (2, SEQ), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
    meg = megatron_sparse_from_save(save_dir)
    with torch.no_grad():
        expected = meg(tokens, pos, None).float()
        got = hf(tokens).logits
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= 1e-4, rel_err(got, expected)
    # The sequence is long enough for the selection to matter: full attention differs.
    for layer in hf.model.layers:
        layer.self_attn.is_msa = False
    with torch.no_grad():
        dense = hf(tokens).logits
    for layer, msa in zip(hf.model.layers, cfg["msa_layers"]):
        layer.self_attn.is_msa = bool(msa)
    assert rel_err(dense, expected) > 1e-3, rel_err(dense, expected)

    prompt = tokens[:1, :40]
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = hf.generate(prompt, use_cache=True, **kw)
        uncached = hf.generate(prompt, use_cache=False, **kw)
    assert cached.shape[1] == 60
    assert torch.equal(cached, uncached)
