"""A tiny MiniMax-M3-layout checkpoint (random, odd sizes, every feature on) and an independent
plain-PyTorch forward of M3's text model, written from the public architecture:

  GemmaRMSNorm (x / rms(x) * (1 + w)) everywhere; per-head q/k norm before a non-interleaved
  partial RoPE on the first rotary_dim channels; GQA softmax attention; on MSA layers an index
  branch (index_q_proj: one head per KV group, index_k_proj: one shared head, per-head Gemma norms,
  the same partial RoPE) whose block-max scores pick each query's top-k blocks (init_block first
  blocks and local_block blocks ending at the query's own always kept); dense MLP / MoE with the
  clamped GPT-OSS GLU "swigluoai"; sigmoid router, top-k on score + e_score_correction_bias,
  weights = renormalised scores x routed_scaling_factor, plus one shared expert.

The block selection uses the project's pure-torch reference (msa_kernels on CPU); everything else
is here, independent of Megatron and of msa_train.model.
"""

from __future__ import annotations

import json
import os
from typing import Dict

import torch

LAYERS = 4
TEXT = dict(
    model_type="minimax_m3", vocab_size=97, hidden_size=40, num_hidden_layers=LAYERS,
    num_attention_heads=6, num_key_value_heads=3, head_dim=10, rotary_dim=6,
    max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    hidden_act="swigluoai", swiglu_alpha=1.702, swiglu_limit=0.9, attention_bias=False,
    dense_intermediate_size=22, intermediate_size=18, shared_intermediate_size=14,
    num_local_experts=5, num_experts_per_tok=2, n_shared_experts=1, scoring_func="sigmoid",
    use_routing_bias=True, norm_topk_prob=True, routed_scaling_factor=2.0,
    moe_layer_freq=[0, 1, 1, 1], num_mtp_modules=1, initializer_range=0.02,
    # Layer 1: full attention + MoE; layers 2, 3: MSA + MoE.
    sparse_attention_config=dict(
        sparse_attention_freq=[0, 0, 1, 1], sparse_block_size=4, sparse_topk_blocks=3,
        sparse_index_dim=10, sparse_num_index_heads=3, sparse_init_block=0, sparse_local_block=1),
)
ALPHA = 1.702


def vl_config(**text_overrides) -> Dict:
    text = json.loads(json.dumps(TEXT))
    sparse = text_overrides.pop("sparse_attention_config", None)
    text.update(text_overrides)
    if sparse:
        text["sparse_attention_config"].update(sparse)
    return {"architectures": ["MiniMaxM3SparseForConditionalGeneration"],
            "model_type": "minimax_m3_vl", "text_config": text,
            "vision_config": {"hidden_size": 8, "num_hidden_layers": 1}, "eos_token_id": 2}


def random_weights(cfg: Dict, seed: int = 0, mtp: bool = True,
                   vision: bool = True) -> Dict[str, torch.Tensor]:
    t = cfg["text_config"]
    g = torch.Generator().manual_seed(seed)

    def w(*shape, std=0.15):
        return torch.randn(*shape, generator=g) * std

    h, d, hq, hkv = t["hidden_size"], t["head_dim"], t["num_attention_heads"], t["num_key_value_heads"]
    sp = t["sparse_attention_config"]
    di = sp["sparse_index_dim"]
    p = "language_model.model."
    out = {p + "embed_tokens.weight": w(t["vocab_size"], h, std=1.0), p + "norm.weight": w(h, std=0.3),
           "language_model.lm_head.weight": w(t["vocab_size"], h, std=0.3)}
    for i in range(t["num_hidden_layers"]):
        L = f"{p}layers.{i}."
        out.update({
            L + "input_layernorm.weight": w(h, std=0.3),
            L + "post_attention_layernorm.weight": w(h, std=0.3),
            L + "self_attn.q_proj.weight": w(hq * d, h), L + "self_attn.k_proj.weight": w(hkv * d, h),
            L + "self_attn.v_proj.weight": w(hkv * d, h), L + "self_attn.o_proj.weight": w(h, hq * d),
            L + "self_attn.q_norm.weight": w(d, std=0.3), L + "self_attn.k_norm.weight": w(d, std=0.3),
        })
        if sp["sparse_attention_freq"][i]:
            out.update({
                L + "self_attn.index_q_proj.weight": w(hkv * di, h, std=0.3),
                L + "self_attn.index_k_proj.weight": w(di, h, std=0.3),
                L + "self_attn.index_q_norm.weight": w(di, std=0.3),
                L + "self_attn.index_k_norm.weight": w(di, std=0.3),
            })
        if t["moe_layer_freq"][i]:
            m = L + "block_sparse_moe."
            f, fs = t["intermediate_size"], t["shared_intermediate_size"]
            out[m + "gate.weight"] = w(t["num_local_experts"], h, std=0.5)
            out[m + "e_score_correction_bias"] = w(t["num_local_experts"], std=0.2)
            for e in range(t["num_local_experts"]):
                out.update({m + f"experts.{e}.w1.weight": w(f, h), m + f"experts.{e}.w3.weight": w(f, h),
                            m + f"experts.{e}.w2.weight": w(h, f)})
            out.update({m + "shared_experts.gate_proj.weight": w(fs, h),
                        m + "shared_experts.up_proj.weight": w(fs, h),
                        m + "shared_experts.down_proj.weight": w(h, fs)})
        else:
            f = t["dense_intermediate_size"]
            out.update({L + "mlp.gate_proj.weight": w(f, h), L + "mlp.up_proj.weight": w(f, h),
                        L + "mlp.down_proj.weight": w(h, f)})
    if mtp:
        out.update({p + "mtp.0.enorm.weight": w(h), p + "mtp.0.eh_proj.weight": w(h, 2 * h)})
    if vision:
        out.update({"vision_tower.patch_embed.weight": w(8, 12),
                    "multi_modal_projector.linear.weight": w(h, 8)})
    return out


def write_checkpoint(directory: str, cfg: Dict, weights: Dict[str, torch.Tensor]) -> str:
    """config.json + two safetensors shards with an index (as published checkpoints are)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    keys = sorted(weights)
    half = len(keys) // 2
    weight_map = {}
    for n, part in enumerate((keys[:half], keys[half:])):
        name = f"model-{n + 1:05d}-of-00002.safetensors"
        save_file({k: weights[k].contiguous() for k in part}, os.path.join(directory, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    return directory


# ----------------------------------------------------------------------------- the reference
def gemma_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w)


def rope(x: torch.Tensor, rot: int, theta: float) -> torch.Tensor:
    """Non-interleaved (NeoX) RoPE on the first `rot` channels of x [T, H, D], positions 0..T-1."""
    half = rot // 2
    inv = 1.0 / theta ** (torch.arange(half, dtype=torch.float64) * 2 / rot)
    ang = torch.arange(x.shape[0], dtype=torch.float64)[:, None] * inv[None]
    cos, sin = ang.cos().float()[:, None], ang.sin().float()[:, None]
    x1, x2 = x[..., :half], x[..., half:rot]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot:]], dim=-1)


def swigluoai(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return gate * torch.sigmoid(ALPHA * gate) * (up + 1)


def _mlp(x, gate, up, down, limit):
    return swigluoai(x @ gate.T, x @ up.T, limit) @ down.T


def _selected_mask(q_idx, k_idx, sp) -> torch.Tensor:
    """[Hkv, T, T] bool: key j is in a block query i selected (and j <= i)."""
    import msa_kernels

    t = q_idx.shape[0]
    bs = sp["sparse_block_size"]
    topk_idx = msa_kernels.select_blocks(
        q_idx.contiguous(), k_idx.contiguous(), torch.tensor([0, t], dtype=torch.int32), bs,
        sp["sparse_topk_blocks"], force_sink=bool(sp["sparse_init_block"]),
        local_window=sp["sparse_local_block"] - 1).long()  # [Hkv, T, topk]
    key_block = torch.arange(t) // bs
    chosen = (topk_idx[..., None] == key_block[None, None, None, :]).any(dim=2)  # [Hkv, T, T]
    return chosen & torch.ones(t, t, dtype=torch.bool).tril()[None]


def reference_logits(cfg: Dict, weights: Dict[str, torch.Tensor], tokens: torch.Tensor,
                     sparse: bool) -> torch.Tensor:
    """tokens [B, T] -> logits [B, T, V] (fp32); `sparse` runs the MSA layers block-sparse."""
    return torch.stack([_forward_one(cfg, weights, row, sparse) for row in tokens])


def _forward_one(cfg, W, tokens, sparse):
    t = cfg["text_config"]
    sp = t["sparse_attention_config"]
    eps, d, hq, hkv = t["rms_norm_eps"], t["head_dim"], t["num_attention_heads"], t["num_key_value_heads"]
    rot, theta, limit = t["rotary_dim"], t["rope_theta"], t["swiglu_limit"]
    p = "language_model.model."
    n = tokens.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    x = W[p + "embed_tokens.weight"][tokens]
    for i in range(t["num_hidden_layers"]):
        L = f"{p}layers.{i}."
        a = gemma_rms(x, W[L + "input_layernorm.weight"], eps)
        q = (a @ W[L + "self_attn.q_proj.weight"].T).view(n, hq, d)
        k = (a @ W[L + "self_attn.k_proj.weight"].T).view(n, hkv, d)
        q = gemma_rms(q, W[L + "self_attn.q_norm.weight"], eps)
        k = gemma_rms(k, W[L + "self_attn.k_norm.weight"], eps)
        v = (a @ W[L + "self_attn.v_proj.weight"].T).view(n, hkv, d)
        q, k = rope(q, rot, theta), rope(k, rot, theta)
        allowed = causal[None].expand(hkv, n, n)
        if sparse and sp["sparse_attention_freq"][i]:
            di = sp["sparse_index_dim"]
            qi = gemma_rms((a @ W[L + "self_attn.index_q_proj.weight"].T).view(n, hkv, di),
                           W[L + "self_attn.index_q_norm.weight"], eps)
            ki = gemma_rms(a @ W[L + "self_attn.index_k_proj.weight"].T,
                           W[L + "self_attn.index_k_norm.weight"], eps)
            qi, ki = rope(qi, rot, theta), rope(ki[:, None], rot, theta)[:, 0]
            allowed = _selected_mask(qi, ki, sp)
        group = torch.arange(hq) // (hq // hkv)
        scores = torch.einsum("ihd,jhd->hij", q, k[:, group]) * d ** -0.5
        scores = scores.masked_fill(~allowed[group], float("-inf"))
        o = torch.einsum("hij,jhd->ihd", scores.softmax(-1), v[:, group]).reshape(n, hq * d)
        x = x + o @ W[L + "self_attn.o_proj.weight"].T
        m = gemma_rms(x, W[L + "post_attention_layernorm.weight"], eps)
        if t["moe_layer_freq"][i]:
            B = L + "block_sparse_moe."
            s = torch.sigmoid(m @ W[B + "gate.weight"].T)
            choice = s + W[B + "e_score_correction_bias"]  # the bias steers the choice only
            top = torch.topk(choice, t["num_experts_per_tok"], dim=-1).indices
            wts = s.gather(-1, top)
            wts = wts / wts.sum(-1, keepdim=True) * t["routed_scaling_factor"]
            y = _mlp(m, W[B + "shared_experts.gate_proj.weight"], W[B + "shared_experts.up_proj.weight"],
                     W[B + "shared_experts.down_proj.weight"], limit)
            for e in range(t["num_local_experts"]):
                wt = (wts * (top == e)).sum(-1, keepdim=True)
                y = y + wt * _mlp(m, W[B + f"experts.{e}.w1.weight"], W[B + f"experts.{e}.w3.weight"],
                                  W[B + f"experts.{e}.w2.weight"], limit)
        else:
            y = _mlp(m, W[L + "mlp.gate_proj.weight"], W[L + "mlp.up_proj.weight"],
                     W[L + "mlp.down_proj.weight"], limit)
        x = x + y
    return gemma_rms(x, W[p + "norm.weight"], eps) @ W["language_model.lm_head.weight"].T
