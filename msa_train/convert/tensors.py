"""The tensor layouts of the rule kinds (msa_train.convert.families.base.KINDS), both directions.

`combine` builds a Megatron tensor from a rule's Hugging Face tensors, `split` inverts it; both
are exact reshuffles (no arithmetic), so a round trip is bit for bit.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from msa_train.convert.families.base import ConversionError
from msa_train.model.config import ModelConfig


def _qkv_sizes(m: ModelConfig):
    per_group = m.num_attention_heads // m.num_query_groups
    return m.num_query_groups, per_group * m.kv_channels, m.kv_channels


def combine_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """[Hq*D, ...], [Hkv*D, ...], [Hkv*D, ...] -> Megatron's [Hkv*(Hq/Hkv + 2)*D, ...]: per KV
    group its query heads, then its key head, then its value head."""
    groups, qg, d = _qkv_sizes(m)
    tail = q.shape[1:]
    parts = (q.reshape(groups, qg, *tail), k.reshape(groups, d, *tail), v.reshape(groups, d, *tail))
    return torch.cat(parts, dim=1).reshape(groups * (qg + 2 * d), *tail)


def split_qkv(qkv: torch.Tensor, m: ModelConfig) -> List[torch.Tensor]:
    groups, qg, d = _qkv_sizes(m)
    tail = qkv.shape[1:]
    grouped = qkv.reshape(groups, qg + 2 * d, *tail)
    q, k, v = torch.split(grouped, [qg, d, d], dim=1)
    return [x.reshape(-1, *tail).contiguous() for x in (q, k, v)]


def combine(kind: str, tensors: Sequence[torch.Tensor], m: ModelConfig) -> torch.Tensor:
    if kind == "copy":
        return tensors[0]
    if kind == "qkv":
        return combine_qkv(*tensors, m)
    if kind == "gate_up":
        return torch.cat(list(tensors), dim=0)
    raise ConversionError(f"rule kind {kind!r} is combined per expert by the converter")


def split(kind: str, tensor: torch.Tensor, m: ModelConfig) -> List[torch.Tensor]:
    if kind == "copy":
        return [tensor]
    if kind == "qkv":
        return split_qkv(tensor, m)
    if kind == "gate_up":
        return [x.contiguous() for x in torch.chunk(tensor, 2, dim=0)]
    raise ConversionError(f"rule kind {kind!r} is split per expert by the converter")


def per_expert_kind(kind: str) -> str:
    """experts -> copy, experts_gate_up -> gate_up (the layout of one expert's slice)."""
    return {"experts": "copy", "experts_gate_up": "gate_up"}.get(kind, kind)
