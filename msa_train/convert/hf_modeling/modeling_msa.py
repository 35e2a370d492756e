"""MSAForCausalLM in plain PyTorch: MiniMax Sparse Attention for inference with transformers.

Each MSA layer has an index branch: per KV group an index query q_idx = x W_qi, one shared index
key k_idx = x W_ki (optional per-head RMSNorm and RoPE). A query scores each causal key block by
the maximum of q_idx . k_idx / sqrt(index_dim) over the block's visible keys, keeps its own (local)
block plus the best topk - 1 earlier blocks (forced sink / window blocks first when configured,
ties to the lower block id) and attends exactly over the selected blocks' causal keys; all query
heads of a KV group share the group's selection. Other layers attend to the full causal context.

Generation keeps a KV cache plus an index-key cache (k_idx per MSA layer), so a decoded token
selects its blocks from every earlier token's index key without recomputing them.

Memory: this reference builds [query x key] score matrices per layer (chunked over queries), so
it suits moderate contexts; the Triton kernels of msa-train are the fast path for training.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_msa import MSAConfig

_QUERY_CHUNK = 1024


class MSACache:
    """Per layer: keys / values [b, Hkv, L, D] after RoPE; for MSA layers also the index keys
    [b, L, Di] after their norm and RoPE."""

    def __init__(self, num_layers: int):
        self.keys: List[Optional[torch.Tensor]] = [None] * num_layers
        self.values: List[Optional[torch.Tensor]] = [None] * num_layers
        self.index_keys: List[Optional[torch.Tensor]] = [None] * num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        k = self.keys[layer_idx]
        return 0 if k is None else k.shape[2]

    @staticmethod
    def _cat(old, new, dim):
        return new if old is None else torch.cat([old, new], dim=dim)

    def update(self, layer: int, k, v, k_idx=None):
        self.keys[layer] = self._cat(self.keys[layer], k, 2)
        self.values[layer] = self._cat(self.values[layer], v, 2)
        if k_idx is not None:
            self.index_keys[layer] = self._cat(self.index_keys[layer], k_idx, 1)
        return self.keys[layer], self.values[layer], self.index_keys[layer]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for store in (self.keys, self.values, self.index_keys):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = t.index_select(0, beam_idx.to(t.device))


# ----------------------------------------------------------------------------- RoPE
def _inv_freq(dim: int, base: float, scaling: Optional[dict]) -> torch.Tensor:
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old = scaling.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def _rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: Optional[dict]):
    pos = positions.to(torch.float32)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind == "linear":
        pos = pos / scaling["factor"]
    freqs = pos[:, None] * inv_freq.to(positions.device)[None, :]  # [n, rot/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., n, D]: RoPE (non-interleaved) on the first cos.shape[-1] channels."""
    rot = cos.shape[-1]
    if rot == 0:
        return x
    xr, rest = x[..., :rot], x[..., rot:]
    xr = (xr.float() * cos + _rotate_half(xr.float()) * sin).to(x.dtype)
    return torch.cat([xr, rest], dim=-1)


# ----------------------------------------------------------------------------- block selection
def _rank_blocks(scores, pos, block_size: int, topk: int, force_sink: bool, local_window: int):
    """scores [H, c, nb] (causal block maxima) of queries at positions pos [c] -> block ids
    [H, c, topk], -1 padded: forced blocks (sink, then window nearest first), the other earlier
    blocks by score (ties -> lower id), then the local block."""
    h, c, nb = scores.shape
    dev = scores.device
    local = torch.div(pos, block_size, rounding_mode="floor")
    bid = torch.arange(nb, device=dev)
    excluded = local_window + 2
    dist = local[:, None] - bid[None, :]
    cls = torch.full((c, nb), excluded, device=dev, dtype=torch.int64)
    cls = torch.where(dist >= 1, torch.full_like(cls, local_window + 1), cls)
    if local_window > 0:
        cls = torch.where((dist >= 1) & (dist <= local_window), dist, cls)
    if force_sink:
        cls = torch.where((bid[None, :] == 0) & (dist >= 1), torch.zeros_like(cls), cls)
    by_score = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    cls_sorted = cls.expand(h, c, nb).gather(-1, by_score)
    order = by_score.gather(-1, torch.sort(cls_sorted, dim=-1, stable=True).indices)
    n_other = torch.clamp(local, max=topk - 1)
    out = torch.full((h, c, topk), -1, dtype=torch.int64, device=dev)
    width = min(topk - 1, nb)
    if width > 0:
        take = order[..., :width]
        keep = torch.arange(width, device=dev)[None, :] < n_other[:, None]
        out[..., :width] = torch.where(keep, take, torch.full_like(take, -1))
    out.scatter_(-1, n_other.view(1, c, 1).expand(h, c, 1), local.view(1, c, 1).expand(h, c, 1))
    return out


def _selected_key_mask(q_idx, k_idx, pos, cfg: MSAConfig) -> torch.Tensor:
    """q_idx [b, Hkv, n, Di], k_idx [b, L, Di], pos [n] -> bool [b, Hkv, n, L]: the causal keys
    of each query's selected blocks."""
    b, hkv, n, di = q_idx.shape
    length = k_idx.shape[1]
    bs = cfg.msa_block_size
    nb = -(-length // bs)
    s = torch.einsum("bhnd,bld->bhnl", q_idx.float(), k_idx.float()) * di ** -0.5
    causal = torch.arange(length, device=s.device)[None, :] <= pos[:, None]  # [n, L]
    s = s.masked_fill(~causal, float("-inf"))
    s = F.pad(s, (0, nb * bs - length), value=float("-inf"))
    block_max = s.view(b * hkv, n, nb, bs).amax(dim=-1)  # [b*Hkv, n, nb]
    ids = _rank_blocks(block_max, pos, bs, cfg.msa_topk, cfg.msa_force_sink, cfg.msa_local_window)
    picked = torch.zeros(b * hkv, n, nb + 1, dtype=torch.bool, device=s.device)
    picked.scatter_(-1, torch.where(ids < 0, torch.full_like(ids, nb), ids), True)
    tokens = picked[..., :nb].repeat_interleave(bs, dim=-1)[..., :length]
    return tokens.view(b, hkv, n, length) & causal


# ----------------------------------------------------------------------------- modules
class MSARMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MSAMLP(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MSAMoE(nn.Module):
    """Softmax routing: top-k of the router logits, renormalised over the k (norm_topk_prob) or
    the full-softmax probabilities of the top k."""

    def __init__(self, cfg: MSAConfig):
        super().__init__()
        self.topk, self.norm_topk = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(MSAMLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.num_experts))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x).float()
        if self.norm_topk:
            top, idx = logits.topk(self.topk, dim=-1)
            weights = top.softmax(dim=-1)
        else:
            weights, idx = logits.softmax(dim=-1).topk(self.topk, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, (expert(x[rows]) * weights[rows, slot, None].to(x.dtype)))
        return out.view(shape)


class MSAAttention(nn.Module):
    def __init__(self, cfg: MSAConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.hq, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_qkv_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.hq * self.d, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=bias)
        self.o_proj = nn.Linear(self.hq * self.d, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = MSARMSNorm(self.d, cfg.rms_norm_eps)
            self.k_norm = MSARMSNorm(self.d, cfg.rms_norm_eps)
        self.is_msa = bool(cfg.msa_layers[layer_idx])
        if self.is_msa:
            di = cfg.msa_index_dim
            self.index_q_proj = nn.Linear(cfg.hidden_size, self.hkv * di, bias=False)
            self.index_k_proj = nn.Linear(cfg.hidden_size, di, bias=False)
            if cfg.msa_index_norm:
                self.index_q_norm = MSARMSNorm(di, cfg.rms_norm_eps)
                self.index_k_norm = MSARMSNorm(di, cfg.rms_norm_eps)
            rot = int(di * cfg.partial_rotary_factor) // 2 * 2 if cfg.msa_index_rope else 0
            # The index RoPE has no frequency scaling (as in msa-train's index branch).
            self.register_buffer("index_inv_freq", _inv_freq(rot, cfg.rope_theta, None) if rot
                                 else torch.zeros(0), persistent=False)

    def _index(self, x, positions):
        b, n, _ = x.shape
        di = self.cfg.msa_index_dim
        q_idx = self.index_q_proj(x).view(b, n, self.hkv, di)
        k_idx = self.index_k_proj(x)
        if self.cfg.msa_index_norm:
            q_idx, k_idx = self.index_q_norm(q_idx), self.index_k_norm(k_idx)
        if self.index_inv_freq.numel():
            cos, sin = _rope_angles(positions, self.index_inv_freq, None)
            q_idx = _apply_rope(q_idx.transpose(1, 2), cos, sin).transpose(1, 2)
            k_idx = _apply_rope(k_idx, cos, sin)
        return q_idx.transpose(1, 2), k_idx  # [b, Hkv, n, Di], [b, n, Di]

    def forward(self, x, positions, rope, cache: Optional[MSACache]):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.hq, self.d)
        k = self.k_proj(x).view(b, n, self.hkv, self.d)
        v = self.v_proj(x).view(b, n, self.hkv, self.d).transpose(1, 2)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q = _apply_rope(q.transpose(1, 2), cos, sin)  # [b, Hq, n, D]
        k = _apply_rope(k.transpose(1, 2), cos, sin)
        q_idx = k_idx = None
        if self.is_msa:
            q_idx, k_idx = self._index(x, positions)
        if cache is not None:
            k, v, k_idx = cache.update(self.layer_idx, k, v, k_idx)
        out = self._attend(q, k, v, q_idx, k_idx, positions)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.hq * self.d))

    def _attend(self, q, k, v, q_idx, k_idx, positions):
        b, _, n, d = q.shape
        g = self.hq // self.hkv
        length = k.shape[2]
        qg = q.view(b, self.hkv, g, n, d)
        outs = []
        for a in range(0, n, _QUERY_CHUNK):
            pos = positions[a:a + _QUERY_CHUNK]
            if self.is_msa:
                mask = _selected_key_mask(q_idx[:, :, a:a + _QUERY_CHUNK], k_idx, pos, self.cfg)
                mask = mask[:, :, None]  # [b, Hkv, 1, c, L]
            else:
                mask = torch.arange(length, device=q.device)[None, :] <= pos[:, None]
            s = torch.einsum("bhgcd,bhld->bhgcl", qg[:, :, :, a:a + _QUERY_CHUNK].float(), k.float())
            s = (s * d ** -0.5).masked_fill(~mask, float("-inf"))
            p = s.softmax(dim=-1)
            outs.append(torch.einsum("bhgcl,bhld->bhgcd", p, v.float()))
        out = torch.cat(outs, dim=3).to(q.dtype)
        return out.reshape(b, self.hq, n, d)


class MSADecoderLayer(nn.Module):
    def __init__(self, cfg: MSAConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = MSARMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MSAAttention(cfg, layer_idx)
        self.post_attention_layernorm = MSARMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        moe = cfg.num_experts and cfg.mlp_layer_types[layer_idx] == "moe"
        self.mlp = MSAMoE(cfg) if moe else MSAMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h, positions, rope, cache):
        h = h + self.self_attn(self.input_layernorm(h), positions, rope, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class MSAPreTrainedModel(PreTrainedModel):
    config_class = MSAConfig
    base_model_prefix = "model"
    _no_split_modules = ["MSADecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, MSARMSNorm):
            module.weight.data.fill_(1.0)


class MSAModel(MSAPreTrainedModel):
    def __init__(self, cfg: MSAConfig):
        super().__init__(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MSADecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = MSARMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        rot = int(cfg.head_dim * cfg.partial_rotary_factor) // 2 * 2
        self.register_buffer("inv_freq", _inv_freq(rot, cfg.rope_theta, cfg.rope_scaling),
                             persistent=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None,
                use_cache=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise NotImplementedError("MSAForCausalLM does not support padded batches: pass "
                                      "sequences without padding (one per row, or batch size 1)")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cache = past_key_values
        if use_cache and cache is None:
            cache = MSACache(len(self.layers))
        start = cache.get_seq_length() if cache is not None else 0
        positions = torch.arange(start, start + h.shape[1], device=h.device)
        rope = _rope_angles(positions, self.inv_freq, self.config.rope_scaling)
        for layer in self.layers:
            h = layer(h, positions, rope, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h),
                                       past_key_values=cache if use_cache else None)


class MSAForCausalLM(MSAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, cfg: MSAConfig):
        super().__init__(cfg)
        self.model = MSAModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # MSACache (keys, values and index keys), made by the model itself

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      use_cache=True, **kwargs):
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            input_ids = input_ids[:, past_key_values.get_seq_length():]
        return {"input_ids": input_ids, "past_key_values": past_key_values,
                "attention_mask": attention_mask, "use_cache": use_cache}

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache)
        logits = self.lm_head(out.last_hidden_state).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)
