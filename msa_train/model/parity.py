"""Parallel-layout-independent parameters, for parity checks (TP/PP/CP/EP/DP vs one process).

Every parameter gets values drawn from a generator seeded by its GLOBAL name (layer index after
the pipeline offset, expert index after the EP offset) for its FULL (unsharded) shape; each rank
keeps its shard. Any layout therefore holds exactly the single-process model, and a reference
tensor can be sliced to any rank's shard for comparison.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Dict, Iterator, Tuple

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"local_experts\.(\d+)\.")


@dataclass
class ShardInfo:
    global_name: str
    full_shape: Tuple[int, ...]
    partition_dim: int  # -1: replicated
    rank: int
    size: int
    glu: bool  # gated fc1: [gate; up] each split across TP


def _strip(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def shard_info(name: str, param: torch.nn.Parameter, config, vp_stage=None) -> ShardInfo:
    name = _strip(name)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    name = _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name)
    is_expert = "local_experts." in name
    if is_expert:
        num_local = config.num_moe_experts // ps.get_expert_model_parallel_world_size()
        ep_rank = ps.get_expert_model_parallel_rank()
        name = _EXPERT.sub(lambda m: f"local_experts.{int(m.group(1)) + ep_rank * num_local}.", name)
    if getattr(param, "tensor_model_parallel", False):
        dim = int(param.partition_dim)
        if is_expert:
            size, rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
        else:
            size, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    else:
        dim, size, rank = -1, 1, 0
    shape = list(param.shape)
    if dim >= 0:
        shape[dim] *= size
    glu = bool(config.gated_linear_unit) and name.endswith("linear_fc1.weight") and dim == 0
    return ShardInfo(name, tuple(shape), dim, rank, size, glu)


def local_slice(full: torch.Tensor, info: ShardInfo) -> torch.Tensor:
    if info.partition_dim < 0 or info.size == 1:
        return full
    if info.glu:
        gate, up = full.chunk(2, dim=0)
        return torch.cat(
            [gate.chunk(info.size, dim=0)[info.rank], up.chunk(info.size, dim=0)[info.rank]]
        )
    return full.chunk(info.size, dim=info.partition_dim)[info.rank]


def _values(info: ShardInfo, std: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(info.global_name.encode()))
    full = torch.randn(info.full_shape, generator=gen, dtype=torch.float32)
    if re.search(r"(norm|layernorm)[^.]*\.weight$|norm_weight$", info.global_name):
        return 1.0 + 0.1 * full  # norm gains near 1
    return std * full


def named_shards(model: torch.nn.Module, config) -> Iterator[Tuple[ShardInfo, torch.nn.Parameter]]:
    for name, param in model.named_parameters():
        yield shard_info(name, param, config), param


@torch.no_grad()
def fill_parameters(model: torch.nn.Module, config, std: float = 0.05) -> None:
    """Overwrite every parameter with its layout-independent value."""
    for info, param in named_shards(model, config):
        param.copy_(local_slice(_values(info, std), info).to(param.dtype))


def to_reference(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in tensors.items()}
