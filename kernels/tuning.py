"""Tile and launch choices of every Triton kernel: the one tuning mechanism of msa_kernels.

Each kernel family has a frozen dataclass and a ``*_tuning(..., interpret)`` function returning the
default for the target: Hopper (measured on H100/H200, kernels/BENCHMARKS.md) or the CPU interpreter
(small tiles so TRITON_INTERPRET=1 tests stay fast; the kernels' code paths are the same). Kernel
entry points take an optional ``tuning=`` argument; tests and sweep scripts pass a modified copy
(``dataclasses.replace(select_tuning(False), block_m=64)``) instead of mutating module state, so a
choice never leaks from one caller into another.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .triton_utils import next_pow2

__all__ = ["SelectTuning", "select_tuning", "KLTuning", "kl_tuning", "FwdConfig", "fwd_config", "BwdConfig",
           "bwd_config", "interpret_tiles"]


def interpret_tiles(device) -> bool:
    """Whether tensors on ``device`` run the CPU interpreter's tiles (anything but CUDA)."""
    return torch.device(device).type != "cuda"


# ----------------------------------------------------------------------------- select_blocks

@dataclass(frozen=True)
class SelectTuning:
    """select_blocks: ``block_m`` queries of one index head per program."""

    block_m: int = 128
    num_warps: int = 8
    num_stages: int = 2


def select_tuning(interpret: bool = False) -> SelectTuning:
    return SelectTuning(block_m=64, num_warps=4, num_stages=1) if interpret else SelectTuning()


# ----------------------------------------------------------------------------- indexer KL

@dataclass(frozen=True)
class KLTuning:
    """Indexer-KL kernels (msa_kernels.kl).

    kv_*: KV-outer passes (``kv_tm`` queries per step, ``kv_bn`` key columns per program, at most
    ``kv_chunk`` queries per unit). qtile_*: the union-tile Q-outer forward. dense_*: the warmup KL.
    union_max_waste: the sparse KL takes the union-tile forward while it computes at most this many
    tile rows per useful (token, block) pick, else the all-KV-outer atomic path (0 = never union).
    """

    kv_tm: int = 64
    kv_bn: int = 128
    kv_chunk: int = 256
    kv_fwd_warps: int = 4
    kv_bwd_warps: int = 8
    stages: int = 2
    union_max_waste: float = 2.0
    qtile_tm: int = 16
    qtile_warps: int = 4
    dense_bm: int = 64
    dense_bn: int = 64
    dense_warps: int = 4


def kl_tuning(interpret: bool = False) -> KLTuning:
    if interpret:
        # union_max_waste stays the Hopper value: the path choice is behaviour, not a tile size.
        return KLTuning(kv_tm=16, kv_bn=16, kv_chunk=8, kv_fwd_warps=4, kv_bwd_warps=4, stages=1, qtile_tm=16,
                        qtile_warps=4, dense_bm=16, dense_bn=16, dense_warps=4)
    return KLTuning()


# ----------------------------------------------------------------------------- sparse attention

@dataclass(frozen=True)
class FwdConfig:
    """Tile shape of the attention forward / Q-outer kernels: rows = tokens_per_tile x padded group size."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def tokens_per_tile(self, group: int) -> int:
        return max(1, min(32, self.block_m // next_pow2(group)))


def fwd_config(head_dim: int, group: int, block_size: int, interpret: bool = False) -> FwdConfig:
    """Default forward tile (H200 sweep). M = 64 rows (8 tokens x 8 heads, 4 x 16) ran as fast as 128
    rows on local/shared patterns and keeps the union of a tile small when neighbouring tokens pick
    different blocks."""
    if interpret:
        return FwdConfig(block_m=max(16, next_pow2(group)), block_n=min(block_size, 32), num_warps=4, num_stages=1)
    return FwdConfig(block_m=max(64, next_pow2(group)), block_n=min(block_size, 64), num_warps=4, num_stages=3)


@dataclass(frozen=True)
class BwdConfig:
    """Attention backward tiles. KV-outer pass: ``block_n`` key rows x (tokens x padded group) query
    rows, at most ``chunk`` queries per unit. dQ: ``dq_mode`` "atomic" (fp32 atomics from the KV-outer
    pass), "qouter" (a separate Q-outer pass over the forward's union tiles, no atomics) or "auto"
    (qouter while the union tiles are dense: union blocks x tokens per tile / picks <= ``auto_ratio``)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    chunk: int
    dq_mode: str = "auto"
    dq_block_n: int = 64
    dq_num_warps: int = 4
    dq_num_stages: int = 2
    auto_ratio: float = 2.5

    def __post_init__(self):
        if self.dq_mode not in ("auto", "atomic", "qouter"):
            raise ValueError(f"dq_mode must be 'auto', 'atomic' or 'qouter', got {self.dq_mode!r}")

    def tokens_per_step(self, group: int) -> int:
        return max(1, self.block_m // next_pow2(group))


def bwd_config(head_dim: int, group: int, block_size: int, interpret: bool = False) -> BwdConfig:
    """Default backward tiles (H200 sweep): the KV pass owns a whole 128-key block with two
    warpgroups (dK, dV in registers) and steps over 64 query rows; chunk = 512 queries per unit
    bounds the tail of blocks picked by every query."""
    if interpret:
        return BwdConfig(block_m=max(16, next_pow2(group)), block_n=min(block_size, 32), num_warps=4,
                         num_stages=1, chunk=64, dq_block_n=min(block_size, 32), dq_num_stages=1)
    return BwdConfig(block_m=max(64, next_pow2(group)), block_n=min(block_size, 128), num_warps=8,
                     num_stages=2, chunk=512, dq_block_n=min(block_size, 64))
