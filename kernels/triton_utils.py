"""Host-side helpers shared by every Triton kernel module (select/, attention/, kl/).

One place for the small launch conventions the kernels agree on: padded tile widths, the tensor-core
precision of a dtype, the per-fragment offset table and the query-tile launch order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_compat import fp32_products, interpreting
from .layout import VarlenLayout

__all__ = ["next_pow2", "pow2_at_least_16", "dot_precision", "dot", "frag_table", "query_tile_table",
           "last_dim_contiguous"]


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def pow2_at_least_16(n: int) -> int:
    """Padded tile width: tl.arange and tl.dot need powers of two, the MMA at least 16."""
    return max(16, triton.next_power_of_2(n))


def dot_precision(dtype: torch.dtype) -> str:
    """The ``PRECISION`` constexpr of :func:`dot` for ``dtype`` operands.

    fp32 inputs multiply in fp32 (TF32 would also reorder top-k near-ties) unless torch's fp32
    matmuls may use TF32 (_triton_compat.fp32_products); bf16/fp16 operands ignore it. "upcast":
    bf16 under the CPU interpreter, whose tl.dot gets bf16 operands produced in-kernel wrong."""
    if dtype == torch.float32 and fp32_products():
        return "ieee"
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"
    return "tf32"


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """tl.dot with fp32 accumulation; PRECISION from :func:`dot_precision` ("upcast" multiplies in
    fp32, only ever chosen under the CPU interpreter)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


def frag_table(layout: VarlenLayout, device) -> torch.Tensor:
    """int64 [F, 4] (q_start, q_len, k_start, k_len) on ``device``, from the layout's host ints."""
    rows = [[fr.q_start, fr.q_len, fr.k_start, fr.k_len] for fr in layout.fragments]
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 4).to(device)


def query_tile_table(layout: VarlenLayout, block_m: int, device):
    """(fragment, first query offset) int32 of every ``block_m`` query tile, most expensive (latest) first.

    Causal work grows with the query position, so launching the late tiles first shortens the tail.
    """
    tiles = [(fr.pos_offset + m0, fr.index, m0) for fr in layout.fragments
             for m0 in range(0, fr.q_len, block_m)]
    tiles.sort(key=lambda x: -x[0])
    tf = torch.tensor([t[1] for t in tiles], dtype=torch.int32)
    tm = torch.tensor([t[2] for t in tiles], dtype=torch.int32)
    return tf.to(device), tm.to(device)


def last_dim_contiguous(*ts):
    """The tensors with a unit last-dim stride (the kernels index rows by stride, columns densely)."""
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]
