"""Megatron [s, b, h, d] tensors <-> the packed varlen layout of msa_kernels, incl. context parallel.

Plain batches: b sequences of s tokens are packed sequence-major into T = b*s rows with
cu_seqlens = [0, s, 2s, ...]. Context parallel (zigzag, megatron.core.utils.get_batch_on_this_cp_rank):
rank r holds chunks r and 2CP-1-r (chunk length C = S / 2CP) of every sequence; its queries form two
fragments per sequence whose keys are the all-gathered sequence (key_starts = b_i * S, key_lens
(r+1)*C and (2CP-r)*C, bottom-right causal alignment). Packed documents (THD, packed_seq_params)
are supported without CP.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region


@dataclass
class PackedLayout:
    """Where the local queries sit in their sequences; int32 tensors on the compute device."""

    cu_seqlens: torch.Tensor  # int32 [F+1] query fragments
    key_starts: Optional[torch.Tensor]  # int32 [F]; None = keys are the queries' own rows
    key_lens: Optional[torch.Tensor]  # int32 [F]
    q_positions: torch.Tensor  # int64 [T] position of each query inside its sequence
    k_positions: torch.Tensor  # int64 [Tk] position of each key row inside its sequence
    # (q_start, q_len, k_start, k_len) per fragment, host ints, for the dense path.
    fragments: List[Tuple[int, int, int, int]]
    total_keys: int

    def kernel_kwargs(self) -> dict:
        if self.key_starts is None:
            return {}
        return {"key_starts": self.key_starts, "key_lens": self.key_lens}


def pack(x: torch.Tensor) -> torch.Tensor:
    """[s, b, H, D] -> [b*s, H, D] (sequence-major)."""
    s, b = x.shape[0], x.shape[1]
    return x.transpose(0, 1).reshape(b * s, *x.shape[2:])


def unpack(x: torch.Tensor, s: int, b: int) -> torch.Tensor:
    """[b*s, H, D] -> [s, b, H*D]."""
    return x.reshape(b, s, -1).transpose(0, 1).contiguous()


def _i32(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


# Layouts are pure functions of the shapes (or of one cu_seqlens tensor), built once and shared by
# every MSA layer and step: building them copies host lists to the GPU (a stream sync each), and a
# fresh cu_seqlens tensor per layer would also miss msa_kernels' layout cache (another sync). The
# tensors of a returned layout are read-only by contract.
@functools.lru_cache(maxsize=32)
def batch_layout(s: int, b: int, device: torch.device) -> PackedLayout:
    cu = [i * s for i in range(b + 1)]
    pos = torch.arange(s, device=device, dtype=torch.int64).repeat(b)
    frags = [(i * s, s, i * s, s) for i in range(b)]
    return PackedLayout(_i32(cu, device), None, None, pos, pos, frags, b * s)


_varlen_last: dict = {}


def varlen_layout(cu_seqlens: torch.Tensor) -> PackedLayout:
    """Packed documents (THD): every document is its own causal sequence. The layout of the last
    cu_seqlens tensor is reused while that same, unmodified tensor comes back (all layers of a
    micro-batch share it)."""
    hit = _varlen_last.get("entry")
    if hit is not None and hit[0]() is cu_seqlens and hit[1] == cu_seqlens._version:
        return hit[2]
    layout = _varlen_layout(cu_seqlens)
    _varlen_last["entry"] = (weakref.ref(cu_seqlens), cu_seqlens._version, layout)
    return layout


def _varlen_layout(cu_seqlens: torch.Tensor) -> PackedLayout:
    cu = [int(v) for v in cu_seqlens.tolist()]
    device = cu_seqlens.device
    pos = torch.cat(
        [torch.arange(cu[i + 1] - cu[i], device=device, dtype=torch.int64) for i in range(len(cu) - 1)]
    ) if len(cu) > 1 else torch.zeros(0, dtype=torch.int64, device=device)
    frags = [(cu[i], cu[i + 1] - cu[i], cu[i], cu[i + 1] - cu[i]) for i in range(len(cu) - 1)]
    return PackedLayout(cu_seqlens.to(torch.int32), None, None, pos, pos, frags, cu[-1])


@functools.lru_cache(maxsize=32)
def zigzag_layout(s_local: int, b: int, cp_size: int, cp_rank: int, device) -> PackedLayout:
    """Layout of a CP rank's zigzag queries against the all-gathered keys (see module doc)."""
    if s_local % 2 != 0:
        raise ValueError(
            f"context parallel needs an even local sequence length (2 zigzag chunks), got {s_local}"
        )
    c = s_local // 2
    s_full = s_local * cp_size
    chunks = (cp_rank, 2 * cp_size - 1 - cp_rank)
    cu, ks, kl, frags = [0], [], [], []
    for i in range(b):
        for j, chunk in enumerate(chunks):
            q_start = i * s_local + j * c
            cu.append(q_start + c)
            ks.append(i * s_full)
            kl.append((chunk + 1) * c)
            frags.append((q_start, c, i * s_full, (chunk + 1) * c))
    local_pos = torch.cat(
        [torch.arange(ch * c, (ch + 1) * c, device=device, dtype=torch.int64) for ch in chunks]
    )
    return PackedLayout(
        cu_seqlens=_i32(cu, device),
        key_starts=_i32(ks, device),
        key_lens=_i32(kl, device),
        q_positions=local_pos.repeat(b),
        k_positions=torch.arange(s_full, device=device, dtype=torch.int64).repeat(b),
        fragments=frags,
        total_keys=b * s_full,
    )


def zigzag_to_natural(cp_size: int, s_local: int, device) -> torch.Tensor:
    """Row permutation taking the CP all-gather order (rank-major, 2 chunks each) to natural order."""
    c = s_local // 2
    idx = []
    for chunk in range(2 * cp_size):
        if chunk < cp_size:
            start = chunk * s_local
        else:
            start = (2 * cp_size - 1 - chunk) * s_local + c
        idx.append(torch.arange(start, start + c, device=device))
    return torch.cat(idx)


def gather_cp(x: torch.Tensor, cp_group, cp_size: int) -> torch.Tensor:
    """[s_local, b, ...] zigzag -> [S, b, ...] natural order over the CP group.

    Autograd: the backward reduce-scatters, so each rank's rows receive the gradients of every
    rank's queries that attended to them.
    """
    if cp_size == 1:
        return x
    s_local = x.shape[0]
    full = gather_from_sequence_parallel_region(x, True, group=cp_group)
    return full.index_select(0, zigzag_to_natural(cp_size, s_local, x.device))
