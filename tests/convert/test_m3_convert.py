"""MiniMax-M3 layout: import-hf uses every text tensor (vision and MTP left out with a note), the
Megatron forward equals the plain-PyTorch M3 reference (dense and sparse, fp32), export-hf gives
back the same tensors bit for bit."""

import json
import os

import pytest
import torch

from msa_train.convert.families.base import ConversionError
from msa_train.convert.importer import import_hf
from tests.convert import m3_reference as ref
from tests.convert.helpers import megatron_logits, megatron_model_from, rel_err

SEQ = 23  # > topk (3) x block (4): the sparse forward differs from the dense one


@pytest.fixture(scope="module")
def m3(tmp_path_factory, megatron_1rank):
    """One random M3 checkpoint and its fp32 import, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("m3")
    cfg = ref.vl_config()
    weights = ref.random_weights(cfg, seed=0)
    hf_dir = ref.write_checkpoint(str(root / "hf"), cfg, weights)
    manifest = import_hf(hf_dir, str(root / "converted"), dtype="fp32", progress=False)
    return dict(root=root, cfg=cfg, weights=weights, hf_dir=hf_dir, manifest=manifest,
                out=str(root / "converted"))


def test_import_uses_every_text_tensor(m3):
    manifest = m3["manifest"]
    assert manifest["family"] == "minimax_m3"
    assert manifest["fresh"] == []  # the index branch comes from the checkpoint
    assert manifest["skipped"] == {"mtp": 2, "vision": 2}
    assert any(n.startswith("WARNING: 2 multi-token-prediction") for n in manifest["notes"])
    model, attn = manifest["model"], manifest["attention"]
    assert model["activation"] == "swigluoai" and model["activation_clamp"] == 0.9
    assert model["norm_zero_centered"] and model["qk_layernorm"]
    assert model["moe_router_score_function"] == "sigmoid"
    assert model["moe_router_enable_expert_bias"] and model["moe_router_topk_scaling_factor"] == 2.0
    assert model["moe_layer_freq"] == [0, 1, 1, 1] and model["ffn_hidden_size"] == 22
    assert model["moe_shared_expert_intermediate_size"] == 14 and model["rotary_percent"] == 0.6
    assert attn["mode"] == "sparse" and attn["layer_map"] == [0, 0, 1, 1]
    assert (attn["block_size"], attn["topk"], attn["index_dim"]) == (4, 3, 10)
    assert not attn["force_sink"] and attn["local_window"] == 0
    assert attn["index_norm"] and attn["index_rope"]
    # 4 layers x 6 attention tensors (q/k/v fused) + 2 MSA layers x 4 index tensors + the dense
    # MLP's 2 + 3 MoE layers x 6 (router, expert bias, experts fc1/fc2, shared fc1/fc2) + 3.
    assert manifest["num_tensors"] == 4 * 6 + 2 * 4 + 2 + 3 * 6 + 3


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_forward_matches_reference(m3, mode):
    model = megatron_model_from(m3["out"], mode=mode)
    tokens = torch.randint(0, 97, (2, SEQ), generator=torch.Generator().manual_seed(3))
    got = megatron_logits(model, tokens)[..., :97]
    expected = ref.reference_logits(m3["cfg"], m3["weights"], tokens, sparse=mode == "sparse")
    assert rel_err(got, expected) <= 1e-4, rel_err(got, expected)
    if mode == "sparse":
        dense = ref.reference_logits(m3["cfg"], m3["weights"], tokens, sparse=False)
        assert rel_err(dense, expected) > 1e-3, "the sequence is too short to be sparse"


def test_export_gives_back_every_tensor_bit_for_bit(m3):
    from safetensors import safe_open

    from msa_train.convert.exporter import export_hf

    out = m3["root"] / "exported"
    report = export_hf(m3["out"], str(out), progress=False)
    assert report["architecture"] == "MiniMaxM3SparseForConditionalGeneration" and not report["msa"]
    got = {}
    for name in os.listdir(out):
        if name.endswith(".safetensors"):
            with safe_open(str(out / name), framework="pt") as fh:
                got.update({k: fh.get_tensor(k) for k in fh.keys()})
    want = {k: v for k, v in m3["weights"].items()
            if k.startswith("language_model.") and ".mtp." not in k}
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    cfg = json.loads((out / "config.json").read_text())
    text = cfg["text_config"]
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "rotary_dim", "moe_layer_freq", "routed_scaling_factor", "swiglu_limit",
                "dense_intermediate_size", "shared_intermediate_size", "intermediate_size"):
        assert text[key] == m3["cfg"]["text_config"][key], key
    sparse = m3["cfg"]["text_config"]["sparse_attention_config"]
    assert text["sparse_attention_config"] == sparse
    assert cfg["eos_token_id"] == 2 and cfg["architectures"] == [report["architecture"]]
    # The export imports again, to the same model.
    again = import_hf(str(out), str(m3["root"] / "again"), dtype="fp32", progress=False)
    assert again["model"] == dict(m3["manifest"]["model"])
    assert again["attention"] == m3["manifest"]["attention"] and again["skipped"] == {}


def test_bf16_import_keeps_the_expert_bias_fp32(m3):
    from msa_train.convert.dcp_io import CheckpointReader
    from msa_train.trainer.ckpt_layout import iteration_dir

    out = m3["root"] / "bf16"
    import_hf(m3["hf_dir"], str(out), progress=False)
    reader = CheckpointReader(iteration_dir(str(out), 0))
    bias = reader.load("decoder.layers.2.mlp.router.expert_bias")
    assert bias.dtype == torch.float32
    key = "language_model.model.layers.2.block_sparse_moe.e_score_correction_bias"
    assert torch.equal(bias, m3["weights"][key])
    assert reader.load("decoder.layers.2.mlp.router.weight").dtype == torch.bfloat16


def test_config_round_trip():
    from msa_train.convert.families import FAMILIES, family_for_config
    from msa_train.convert.importer import model_config_from_hf
    from msa_train.model.config import AttentionConfig

    family = FAMILIES["minimax_m3"]
    cfg = ref.vl_config()
    assert family_for_config(cfg) is family
    assert family_for_config({"architectures": [family.architecture]}) is family
    m = model_config_from_hf(cfg)
    assert model_config_from_hf(family.to_hf(m)) == m  # flat text config reads the same
    attn = AttentionConfig(**family.to_attention(cfg))
    wrapped = family.wrap_hf(family.to_hf(m), attn, cfg)
    assert model_config_from_hf(wrapped) == m
    sparse = cfg["text_config"]["sparse_attention_config"]
    assert wrapped["text_config"]["sparse_attention_config"] == sparse
    sink = ref.vl_config(sparse_attention_config=dict(sparse_init_block=1, sparse_local_block=3))
    a = family.to_attention(sink)
    assert a["force_sink"] and a["local_window"] == 2


def _convert(tmp_path, cfg, weights, **kw):
    hf_dir = ref.write_checkpoint(str(tmp_path / "hf"), cfg, weights)
    return import_hf(hf_dir, str(tmp_path / "out"), dtype="fp32", progress=False, **kw)


@pytest.mark.parametrize("case,change,message", [
    ("attention_flag", "attention", "carries its own MSA layout"),
    ("init_block", dict(sparse_attention_config=dict(sparse_init_block=2)), "sparse_init_block=2"),
    ("silu", dict(hidden_act="silu"), "hidden_act='silu'"),
    ("index_heads", dict(sparse_attention_config=dict(sparse_num_index_heads=1)), "one index head"),
    ("missing_index", "drop", "self_attn.index_k_norm.weight"),
])
def test_bad_checkpoints_are_refused_naming_the_cause(tmp_path, megatron_1rank, case, change, message):
    cfg = ref.vl_config(**(change if isinstance(change, dict) else {}))
    weights = ref.random_weights(cfg, seed=1, mtp=False, vision=False)
    kw = {}
    if change == "attention":
        kw["attention"] = "m3"
    if change == "drop":
        del weights["language_model.model.layers.3.self_attn.index_k_norm.weight"]
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _convert(tmp_path, cfg, weights, **kw)
    assert not (tmp_path / "out").exists()  # nothing written


def test_cli_prints_the_left_out_tensors(m3, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "msa_train.convert.cli", "import-hf", m3["hf_dir"],
                           str(tmp_path / "cli")], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "msa-convert: WARNING: 2 multi-token-prediction (MTP) tensors left out" in proc.stderr
    assert "msa-convert: 2 vision-tower tensors left out" in proc.stderr
    assert "minimax_m3 -> " in proc.stdout and "0 fresh index-branch tensors" in proc.stdout
    assert "msa-train experiment=m3_cpt checkpoint.init_from=" in proc.stdout


def test_fp8_block_quantized_checkpoint_imports_dequantized(tmp_path, megatron_1rank):
    """Block-wise fp8 weights (weight + weight_scale_inv, quantization_config.weight_block_size)
    are dequantized on read; the scales are not tensors of their own."""
    from msa_train.convert.dcp_io import CheckpointReader
    from msa_train.trainer.ckpt_layout import iteration_dir

    cfg = ref.vl_config()
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [4, 8]}
    weights = ref.random_weights(cfg, seed=4, mtp=False, vision=False)
    stored, expected = dict(weights), {}
    for key in [k for k in weights if ".layers.2.block_sparse_moe.experts." in k]:
        w = weights[key]
        rows, cols = -(-w.shape[0] // 4), -(-w.shape[1] // 8)  # ceil: odd sizes leave partial blocks
        scale = torch.rand(rows, cols) * 0.01 + 0.001
        full = scale.repeat_interleave(4, 0)[: w.shape[0]].repeat_interleave(8, 1)[:, : w.shape[1]]
        stored[key] = (w / full).to(torch.float8_e4m3fn)
        stored[key + "_scale_inv"] = scale
        expected[key] = stored[key].float() * full
    manifest = _convert(tmp_path, cfg, stored)
    assert manifest["skipped"] == {}
    reader = CheckpointReader(iteration_dir(str(tmp_path / "out"), 0))
    fc1 = reader.load("decoder.layers.2.mlp.experts.experts.linear_fc1.weight")
    e = "language_model.model.layers.2.block_sparse_moe.experts.3."
    assert torch.equal(fc1[3], torch.cat([expected[e + "w1.weight"], expected[e + "w3.weight"]]))
    # Without the quantization_config the scales are refused, naming one.
    del cfg["quantization_config"]
    with pytest.raises(ConversionError, match="weight_scale_inv"):
        _convert(tmp_path / "b", cfg, stored)
