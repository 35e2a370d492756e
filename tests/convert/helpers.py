"""Tiny random Hugging Face models (built here, odd sizes) and the Megatron side of the parity."""

from __future__ import annotations

import os

import torch

# hidden 40 (not a power of two), head_dim 10; GQA ratio = heads / kv_heads.
BASE = dict(vocab_size=97, hidden_size=40, intermediate_size=56, num_hidden_layers=3,
            num_attention_heads=6, num_key_value_heads=3, head_dim=10, max_position_embeddings=256,
            rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# Attention config for the import: small blocks; MSA on layers 1.. (layer 0 full attention).
ATTN_YAML = "mode: sparse\nblock_size: 4\ntopk: 3\nindex_dim: 8\ndense_first_layers: 1\n"


def hf_config(family: str, **overrides):
    import transformers as tf

    kw = dict(BASE)
    if family == "qwen2":
        kw.pop("head_dim")
        kw.update(num_attention_heads=4, num_key_value_heads=2)  # head_dim 10 = hidden / heads
    if family in ("qwen3_moe", "mixtral"):
        kw.update(num_hidden_layers=2)
    if family == "qwen3_moe":
        kw.update(num_experts=3, num_experts_per_tok=2, moe_intermediate_size=18,
                  norm_topk_prob=True, mlp_only_layers=[0])
    if family == "mixtral":
        kw.update(num_local_experts=3, num_experts_per_tok=2, intermediate_size=18)
    if family in ("mistral", "mixtral"):
        kw.update(sliding_window=None)
    kw.update(overrides)
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config,
           "mistral": tf.MistralConfig, "qwen3_moe": tf.Qwen3MoeConfig,
           "mixtral": tf.MixtralConfig}[family]
    return cls(**kw)


def make_hf_model(tmp_path, family: str, seed: int = 0, **overrides):
    """A random fp32 model saved as safetensors under tmp_path/hf; returns (model, dir)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    cfg._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        # Random norms and biases too, so a swapped or dropped tensor shows in the logits.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
    out = os.path.join(str(tmp_path), "hf")
    model.save_pretrained(out, safe_serialization=True)
    return model, out


def attention_file(tmp_path, text: str = ATTN_YAML) -> str:
    path = os.path.join(str(tmp_path), "attn.yaml")
    with open(path, "w") as fh:
        fh.write(text)
    return path


def megatron_model_from(converted_dir: str, mode: str = None):
    """Build the single-rank Megatron model described by an import's manifest and load it with
    the trainer's init_from loader."""
    from msa_train.convert import converted
    from msa_train.model import build_model, build_transformer_config, set_msa_mode
    from msa_train.trainer.ckpt_layout import resolve
    from msa_train.trainer.init_from import load_weights

    manifest = converted.read_manifest(converted_dir)
    model_cfg = converted.model_from_dict(manifest["model"])
    attn = converted.attention_from_dict(manifest["attention"])
    model = build_model(build_transformer_config(model_cfg, attn, {}, torch.float32))
    report = load_weights(resolve(converted_dir, "init_from"), [model], lambda n: ".indexer." in n)
    assert not report.added, report.added
    if mode:
        set_msa_mode(model, mode)
    return model.eval()


def megatron_sparse_from_save(save_dir):
    """The one-rank Megatron model of an msa-train checkpoint (any saving layout), sparse mode."""
    from msa_train.convert.exporter import resolve_source
    from msa_train.model import build_model, build_transformer_config, set_msa_mode
    from msa_train.trainer.init_from import load_weights

    src = resolve_source(save_dir)
    model = build_model(build_transformer_config(src.model, src.attention, {}, torch.float32))
    load_weights(src.iteration_dir, [model], lambda n: False)
    set_msa_mode(model, "sparse")
    return model.eval()


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, pos, None).float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
