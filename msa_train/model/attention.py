"""MSA attention inside Megatron-Core: MSASelfAttention (hands the layer input to the index branch)
and MSACoreAttention (the core attention for both MSA and full-attention layers).

Megatron's core-attention contract: query [sq, b, np/TP, hn], key/value [sk, b, ng/TP, hn] after
RoPE; return [sq, b, np/TP*hn]; causality and GQA are ours. The tensors are packed to the
msa_kernels layout [T, H, D] (msa_train.model.packing); under CP, K, V and k_idx are all-gathered
over the CP group and the zigzag query chunks become two fragments per sequence.

A layer is MSA when config.msa_layer_map says so; other layers are the same module without the
index branch (full causal attention). MSA layers run in config.msa_mode:
  dense  (stage 1): full causal main branch, KL over the full causal context;
  sparse (stage 2): top-k block-sparse main branch, KL on the selected support.
The KL (share of the micro-batch mean on this rank) is attached to the output through
KLAutoScaler and recorded in kl_tracker; it is computed only when gradients are enabled, so
activation recompute (no-grad first pass) counts it once.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from msa_train.model import kl_tracker, recall
from msa_train.model.dense_attention import causal_attention
from msa_train.model.indexer import MSAIndexer, apply_index_rope
from msa_train.model.kl_scaler import KLAutoScaler
from msa_train.model.packing import (
    PackedLayout,
    batch_layout,
    gather_cp,
    pack,
    unpack,
    varlen_layout,
    zigzag_layout,
)


class MSACoreAttention(MegatronModule):
    """Core attention with an optional MSA index branch (see module docstring)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if attention_type != "self":
            raise ValueError(f"MSACoreAttention supports self-attention only, got {attention_type!r}")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(
                f"MSACoreAttention needs a causal mask type, got {attn_mask_type}; "
                "use the MSA layer spec (attn_mask_type=causal)"
            )
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout > 0:
            raise ValueError(
                f"attention_dropout={dropout} is not supported by MSA core attention; set it to 0"
            )
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.cp_group = pg_collection.cp
        self.cp_size = self.cp_group.size()
        self.layer_number = layer_number
        head_dim = k_channels if k_channels is not None else config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.is_msa = bool(config.msa_layer_map[layer_number - 1])
        self.mode = config.msa_mode
        self.indexer = MSAIndexer(config, pg_collection) if self.is_msa else None
        # The normalized layer input, handed over by MSASelfAttention for this forward only.
        self.pending_input: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ layout
    def _layout(self, sq: int, b: int, packed_seq_params, device) -> PackedLayout:
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            if self.cp_size > 1:
                raise NotImplementedError(
                    "MSA core attention: packed documents (packed_seq_params, THD) with "
                    "parallel.cp > 1 are not supported; use cp=1 or unpacked batches"
                )
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
            return varlen_layout(cu.to(device))
        if self.cp_size > 1:
            return zigzag_layout(sq, b, self.cp_size, self.cp_group.rank(), device)
        return batch_layout(sq, b, device)

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        x, self.pending_input = self.pending_input, None
        if attention_mask is not None:
            raise ValueError(
                "MSA core attention builds its causal mask itself and got an explicit "
                "attention_mask; pass attention_mask=None (data: create_attention_mask=False)"
            )
        if attention_bias is not None:
            raise ValueError("MSA core attention does not support attention_bias")
        if attn_mask_type not in (None, AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"MSA core attention supports causal masks only, got {attn_mask_type}")

        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if thd:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        sq, b = query.shape[0], query.shape[1]
        layout = self._layout(sq, b, packed_seq_params, query.device)
        q = pack(query)  # [T, Hq/TP, D]
        k = pack(gather_cp(key, self.cp_group, self.cp_size))  # [Tk, Hkv/TP, D]
        v = pack(gather_cp(value, self.cp_group, self.cp_size))

        if not self.is_msa:
            out = causal_attention(q, k, v, layout, self.softmax_scale)
        else:
            if x is None:
                raise RuntimeError(
                    f"MSA layer {self.layer_number}: no layer input was handed to the core "
                    "attention; build the layer with the MSA spec (MSASelfAttention)"
                )
            out = self._msa_forward(q, k, v, x, layout)
        out = unpack(out, sq, b)  # [sq, b, Hq/TP * D]
        return out.squeeze(1) if thd else out

    def _index_tensors(self, x: torch.Tensor, layout: PackedLayout):
        q_idx, k_idx = self.indexer(x)  # [s, b, Hkv/TP, Di], [s, b, Di]
        q_idx = pack(q_idx)  # [T, Hkv/TP, Di]
        k_idx = pack(gather_cp(k_idx, self.cp_group, self.cp_size))  # [Tk, Di]
        if self.indexer.rope_dim:
            q_idx = apply_index_rope(q_idx, layout.q_positions, self.indexer.rope_dim, self.indexer.rope_base)
            k_idx = apply_index_rope(k_idx, layout.k_positions, self.indexer.rope_dim, self.indexer.rope_base)
        return q_idx.contiguous(), k_idx.contiguous()

    def _msa_forward(self, q, k, v, x, layout: PackedLayout) -> torch.Tensor:
        import msa_kernels

        cfg = self.config
        q_idx, k_idx = self._index_tensors(x, layout)
        kw = dict(layout.kernel_kwargs(), backend=cfg.msa_kernels)
        want_kl = self.training and torch.is_grad_enabled()
        topk_idx = None
        if self.mode == "sparse":
            with torch.no_grad():
                topk_idx = msa_kernels.select_blocks(
                    q_idx, k_idx, layout.cu_seqlens, cfg.msa_block_size, cfg.msa_topk,
                    force_sink=cfg.msa_force_sink, local_window=cfg.msa_local_window, **kw,
                )
            if want_kl:
                # One node: the KL's key gradient rides along the attention backward, which
                # recomputes the teacher probabilities anyway.
                out, lse, kl_sum = msa_kernels.sparse_attention_and_kl(
                    q, k, v, topk_idx, q_idx, k_idx, layout.cu_seqlens, cfg.msa_block_size,
                    scale=self.softmax_scale, reduction="sum", deterministic=cfg.msa_deterministic, **kw,
                )
            else:
                out, lse = msa_kernels.sparse_attention(
                    q, k, v, topk_idx, layout.cu_seqlens, cfg.msa_block_size,
                    scale=self.softmax_scale, deterministic=cfg.msa_deterministic, **kw,
                )
        else:
            out = causal_attention(q, k, v, layout, self.softmax_scale)
            if want_kl:
                kl_sum = msa_kernels.indexer_kl_dense(
                    q.detach(), k.detach(), q_idx, k_idx, layout.cu_seqlens,
                    scale=self.softmax_scale, reduction="sum",
                    deterministic=cfg.msa_deterministic, **kw,
                )
        if not want_kl and recall.recall_requested():
            # Evaluation (no grad): the KL is a measurement only, next to the recall metrics.
            with torch.no_grad():
                if self.mode == "sparse":
                    kl_sum = msa_kernels.indexer_kl(
                        q, k, lse, q_idx, k_idx, topk_idx, layout.cu_seqlens, cfg.msa_block_size,
                        scale=self.softmax_scale, reduction="sum", **kw)
                else:
                    kl_sum = msa_kernels.indexer_kl_dense(
                        q, k, q_idx, k_idx, layout.cu_seqlens, scale=self.softmax_scale,
                        reduction="sum", **kw)
        if want_kl or recall.recall_requested():
            # This rank's share of the micro-batch mean over (token, group): summing over TP
            # (groups) and CP (tokens) ranks gives the global mean.
            denom = layout.q_positions.numel() * self.cp_size * cfg.num_query_groups
            kl = kl_sum / denom
            kl_tracker.record(self.layer_number, kl)
            if want_kl and cfg.msa_kl_coeff > 0:
                out = KLAutoScaler.apply(out, kl, float(cfg.msa_kl_coeff))
        if recall.recall_requested():
            self._record_recall(q, k, q_idx, k_idx, topk_idx, layout)
        return out

    @torch.no_grad()
    def _record_recall(self, q, k, q_idx, k_idx, topk_idx, layout: PackedLayout) -> None:
        import msa_kernels

        cfg = self.config
        if topk_idx is None:
            topk_idx = msa_kernels.select_blocks(
                q_idx, k_idx, layout.cu_seqlens, cfg.msa_block_size, cfg.msa_topk,
                force_sink=cfg.msa_force_sink, local_window=cfg.msa_local_window,
                backend=cfg.msa_kernels, **layout.kernel_kwargs(),
            )
        rows = recall.sample_rows(q.shape[0], cfg.msa_recall_num_queries, q.device)
        sums = recall.compute_recall(
            q, k, topk_idx, layout, cfg.msa_block_size, self.softmax_scale, rows
        )
        recall.record(self.layer_number, sums)


class MSASelfAttention(SelfAttention):
    """SelfAttention that hands its (normalized) input to the core attention's index branch."""

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        if getattr(self.core_attention, "is_msa", False):
            self.core_attention.pending_input = hidden_states
        try:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        finally:
            self.core_attention.pending_input = None

    def _checkpointed_attention_forward(
        self, query, key, value, attention_mask, rotary_pos_emb=None, attn_mask_type=None,
        attention_bias=None, packed_seq_params=None,
    ):
        # The recompute re-runs the core attention during backward, after forward() has
        # returned: keep the layer input in the closure instead of on the module.
        x = self.core_attention.pending_input
        core = self.core_attention

        def custom_forward(query, key, value):
            core.pending_input = x
            return core(
                query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                attention_bias=attention_bias, packed_seq_params=packed_seq_params,
            )

        return tensor_parallel.checkpoint(custom_forward, False, query, key, value)


def set_msa_mode(model_or_config, mode: str) -> None:
    """Switch every MSA layer (and the config objects they hold) to 'dense' or 'sparse' at
    runtime, without rebuilding. Accepts a model, a list of model chunks, or a config."""
    from msa_train.model.config import MSA_MODES

    if mode not in MSA_MODES:
        raise ValueError(f"msa mode must be one of {MSA_MODES}, got {mode!r}")
    targets = model_or_config if isinstance(model_or_config, (list, tuple)) else [model_or_config]
    for target in targets:
        if isinstance(target, torch.nn.Module):
            for module in target.modules():
                if isinstance(module, MSACoreAttention):
                    module.mode = mode
                cfg = getattr(module, "config", None)
                if cfg is not None and hasattr(cfg, "msa_mode"):
                    cfg.msa_mode = mode
        elif hasattr(target, "msa_mode"):
            target.msa_mode = mode
        else:
            raise TypeError(f"set_msa_mode needs a model or MSATransformerConfig, got {type(target)}")
