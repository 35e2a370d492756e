"""Packed varlen / context-parallel layout shared by every MSA operator.

Queries are packed into fragments delimited by ``cu_seqlens`` (int32 [F+1]). Fragment f's queries are
the LAST ``qlen_f`` positions of a key sequence of ``key_lens[f]`` tokens that starts at row
``key_starts[f]`` of k / v / k_idx (bottom-right causal alignment). By default the keys are the
queries' own tokens (self-attention). Query i of fragment f therefore sits at position
``pos_offset[f] + i`` inside its sequence, with ``pos_offset[f] = key_lens[f] - qlen_f``, and sees key
positions ``j <= pos_offset[f] + i``. Blocks of ``block_size`` tokens are aligned to the key sequence's
first token, so block ids are local to the sequence.

A context-parallel rank holding zigzag chunks c and 2*CP-1-c (chunk length C) of a sequence passes two
fragments, both with key_starts = the sequence's first row in the all-gathered K, and key_lens
(c+1)*C and (2*CP-c)*C.

``make_layout`` validates once per op call and returns a frozen ``VarlenLayout`` holding both device
tensors (for the Triton kernels) and plain Python tuples (for the reference and for grid sizing).
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Tuple

import torch

__all__ = ["Fragment", "VarlenLayout", "make_layout", "cached_layout", "check_tensor", "query_chunks"]

# fp32 elements of the largest per-chunk score matrix the reference builds ([heads, chunk, key_len]):
# 16 MiB on CPU keeps long-context runs O(T x chunk) while tiny inputs run in one chunk (tests lower it
# to exercise the chunk loop); 256 MiB on CUDA, where the reference is the GPU parity oracle at 8K-32K
# tokens and a small chunk would make the Python loop the bottleneck.
REFERENCE_CHUNK_ELEMENTS = 1 << 22
REFERENCE_CHUNK_ELEMENTS_CUDA = 1 << 26


class Fragment(NamedTuple):
    """One fragment in plain Python ints (the reference loops over these)."""

    index: int
    q_start: int  # first query row in q / q_idx / out
    q_len: int
    k_start: int  # first key row in k / v / k_idx (= the sequence's position 0)
    k_len: int
    pos_offset: int  # position of the fragment's first query inside its sequence (k_len - q_len)

    def num_blocks(self, block_size: int) -> int:
        return -(-self.k_len // block_size)


@dataclass(frozen=True, eq=False)  # tensor fields: identity equality, not elementwise
class VarlenLayout:
    """Validated fragment layout. Build it with :func:`make_layout`, never by hand.

    Device tensors (same device as ``cu_seqlens``), for kernels:
      cu_seqlens  int32 [F+1]  query offsets (as given)
      q_starts    int64 [F]    first query row of each fragment
      q_lens      int32 [F]
      k_starts    int64 [F]    first key row of each fragment's sequence
      k_lens      int32 [F]
      pos_offsets int32 [F]    k_lens - q_lens
    Starts are int64 so that ``row * row_stride`` never wraps past 2^31 inside a kernel; kernels must
    still widen any int32 value before multiplying it by a stride.
    """

    cu_seqlens: torch.Tensor
    q_starts: torch.Tensor
    q_lens: torch.Tensor
    k_starts: torch.Tensor
    k_lens: torch.Tensor
    pos_offsets: torch.Tensor
    fragments: Tuple[Fragment, ...]
    total_q: int
    total_k: int
    max_q_len: int
    max_k_len: int
    is_self: bool  # keys are the queries' own rows (no key_starts / key_lens given)

    @property
    def num_fragments(self) -> int:
        return len(self.fragments)

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    def num_blocks(self, block_size: int) -> torch.Tensor:
        """int32 [F]: key blocks per fragment's sequence (ceil(k_len / block_size))."""
        return torch.div(self.k_lens + (block_size - 1), block_size, rounding_mode="floor").to(torch.int32)

    def max_blocks(self, block_size: int) -> int:
        return -(-self.max_k_len // block_size)

    def total_blocks(self, block_size: int) -> int:
        """Key blocks summed over the fragments: an upper bound on the distinct blocks any selection
        can pick (CP fragments sharing a sequence count it twice: fine), known without a sync."""
        return sum(fr.num_blocks(block_size) for fr in self.fragments)

    def token_fragment(self) -> torch.Tensor:
        """int32 [T]: fragment index of every query row."""
        frag = torch.arange(self.num_fragments, device=self.device, dtype=torch.int32)
        return torch.repeat_interleave(frag, self.q_lens.to(torch.int64), output_size=self.total_q)

    def token_positions(self) -> torch.Tensor:
        """int64 [T]: position of every query row inside its sequence."""
        frag = self.token_fragment().to(torch.int64)
        row = torch.arange(self.total_q, device=self.device, dtype=torch.int64)
        return row - self.q_starts[frag] + self.pos_offsets[frag].to(torch.int64)

    def __iter__(self) -> Iterator[Fragment]:
        return iter(self.fragments)


def _check_index_tensor(t: torch.Tensor, name: str, ndim: int = 1) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (int32), got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def make_layout(
    cu_seqlens: torch.Tensor,
    key_starts: Optional[torch.Tensor] = None,
    key_lens: Optional[torch.Tensor] = None,
    *,
    total_keys: int,
    total_queries: Optional[int] = None,
) -> VarlenLayout:
    """Validate ``cu_seqlens`` (+ optional ``key_starts`` / ``key_lens``) and build a VarlenLayout.

    total_keys: rows of k / v / k_idx. total_queries: rows of q (checked against cu_seqlens[-1]).
    Reads the offsets to the host once (one device sync), as flash-attn's max_seqlen would.
    """
    _check_index_tensor(cu_seqlens, "cu_seqlens")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold at least 2 offsets ([0, T]), got {cu_seqlens.numel()}")
    if (key_starts is None) != (key_lens is None):
        raise ValueError("key_starts and key_lens must be given together (or both left None for self-attention)")
    num_frag = cu_seqlens.numel() - 1
    cu = [int(x) for x in cu_seqlens.tolist()]
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens[0] must be 0, got {cu[0]}")
    q_lens = [cu[f + 1] - cu[f] for f in range(num_frag)]
    if any(n < 0 for n in q_lens):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu}")
    total_q = cu[-1]
    if total_queries is not None and total_q != total_queries:
        raise ValueError(f"cu_seqlens[-1] = {total_q} must equal the number of query rows ({total_queries})")
    if total_keys < 0:
        raise ValueError(f"total_keys must be >= 0, got {total_keys}")

    if key_starts is None:
        if total_keys != total_q:
            raise ValueError(
                f"without key_starts/key_lens the keys are the queries' own rows: k has {total_keys} rows "
                f"but cu_seqlens[-1] = {total_q}; pass key_starts and key_lens for a separate key layout")
        ks, kl = cu[:-1], q_lens
    else:
        for t, name in ((key_starts, "key_starts"), (key_lens, "key_lens")):
            _check_index_tensor(t, name)
            if t.numel() != num_frag:
                raise ValueError(f"{name} must have one entry per fragment ({num_frag}), got {t.numel()}")
            if t.device != cu_seqlens.device:
                raise ValueError(f"{name} is on {t.device} but cu_seqlens is on {cu_seqlens.device}")
        ks = [int(x) for x in key_starts.tolist()]
        kl = [int(x) for x in key_lens.tolist()]
        for f in range(num_frag):
            if ks[f] < 0:
                raise ValueError(f"key_starts[{f}] = {ks[f]} must be >= 0")
            if kl[f] < q_lens[f]:
                raise ValueError(
                    f"key_lens[{f}] = {kl[f]} must be >= the fragment's query count {q_lens[f]} "
                    "(queries are the last positions of their key sequence)")
            if ks[f] + kl[f] > total_keys:
                raise ValueError(
                    f"key_starts[{f}] + key_lens[{f}] = {ks[f] + kl[f]} exceeds the {total_keys} key rows")

    frags = tuple(
        Fragment(f, cu[f], q_lens[f], ks[f], kl[f], kl[f] - q_lens[f]) for f in range(num_frag))
    dev = cu_seqlens.device

    def _t(vals, dtype):
        return torch.tensor(vals, dtype=dtype, device=dev)

    return VarlenLayout(
        cu_seqlens=cu_seqlens,
        q_starts=_t(cu[:-1], torch.int64),
        q_lens=_t(q_lens, torch.int32),
        k_starts=_t(ks, torch.int64),
        k_lens=_t(kl, torch.int32),
        pos_offsets=_t([fr.pos_offset for fr in frags], torch.int32),
        fragments=frags,
        total_q=total_q,
        total_k=total_keys,
        max_q_len=max(q_lens, default=0),
        max_k_len=max(kl, default=0),
        is_self=key_starts is None,
    )


# The ops of one layer (and usually every layer of a step) receive the same offset tensors: caching
# their layout saves a host sync and three small host-to-device copies per op call.
_CACHE_SIZE = 8
_cache: OrderedDict = OrderedDict()


def _tensor_key(t: Optional[torch.Tensor]):
    return None if t is None else (id(t), t._version)


def _cacheable(*ts: Optional[torch.Tensor]) -> bool:
    # Inference-mode tensors have no version counter, so an in-place edit could not be detected.
    return all(t is None or (isinstance(t, torch.Tensor) and not t.is_inference()) for t in ts)


def cached_layout(cu_seqlens: torch.Tensor, key_starts: Optional[torch.Tensor] = None,
                  key_lens: Optional[torch.Tensor] = None, *, total_keys: int,
                  total_queries: Optional[int] = None) -> VarlenLayout:
    """:func:`make_layout`, reusing the result while the same, unmodified offset tensors come back.

    Keyed on tensor identity and version counter (in-place edits invalidate), held by weak
    reference so that a freed tensor whose id is reused never matches.
    """
    if not _cacheable(cu_seqlens, key_starts, key_lens):
        return make_layout(cu_seqlens, key_starts, key_lens, total_keys=total_keys, total_queries=total_queries)
    key = (_tensor_key(cu_seqlens), _tensor_key(key_starts), _tensor_key(key_lens), total_keys, total_queries)
    hit = _cache.get(key)
    if hit is not None:
        refs, layout = hit
        if all((r is None and t is None) or (r is not None and r() is t)
               for r, t in zip(refs, (cu_seqlens, key_starts, key_lens))):
            _cache.move_to_end(key)
            return layout
    layout = make_layout(cu_seqlens, key_starts, key_lens, total_keys=total_keys, total_queries=total_queries)
    refs = tuple(None if t is None else weakref.ref(t) for t in (cu_seqlens, key_starts, key_lens))
    _cache[key] = (refs, layout)
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return layout


def check_tensor(t: torch.Tensor, name: str, shape: Tuple[Optional[int], ...], *,
                 floating: bool = True, device: Optional[torch.device] = None) -> None:
    """Raise a clear error unless ``t`` has the given shape (None = any size) and kind of dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")


def query_chunks(frag: Fragment, elems_per_query: int, device: torch.device) -> Iterator[Tuple[int, int]]:
    """Yield [a, b) query ranges (local to ``frag``) whose score matrices fit the chunk budget."""
    budget = REFERENCE_CHUNK_ELEMENTS_CUDA if device.type == "cuda" else REFERENCE_CHUNK_ELEMENTS
    step = max(1, budget // max(1, elems_per_query))
    for a in range(0, frag.q_len, step):
        yield a, min(frag.q_len, a + step)
