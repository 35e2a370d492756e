"""msa_kernels: MiniMax Sparse Attention operators (exact PyTorch reference + Hopper Triton kernels).

Semantics and the public API's contract: docs/ARCHITECTURE.md ("msa_kernels public API"); kernel
design and measured speed: kernels/BENCHMARKS.md. Layout: packed varlen, fragments delimited by ``cu_seqlens``
(int32 [F+1]); optional ``key_starts`` / ``key_lens`` (int32 [F]) place each fragment's queries at the
END of a key sequence that starts at row ``key_starts[f]`` of k / v / k_idx (bottom-right causal
alignment; context parallelism). See :mod:`msa_kernels.layout`. GQA: query head h belongs to group
(KV head) ``h // G`` with ``G = Hq // Hkv``.

Public ops
----------
select_blocks(q_idx [T,Hkv,Di], k_idx [Tk,Di], cu_seqlens, block_size=128, topk=16, *,
              index_scale=None, key_starts=None, key_lens=None, force_sink=False, local_window=0)
    -> int32 [Hkv, T, topk]
sparse_attention(q [T,Hq,D], k [Tk,Hkv,D], v [Tk,Hkv,D], topk_idx, cu_seqlens, block_size=128, *,
                 scale=None, key_starts=None, key_lens=None, deterministic=False)
    -> (out [T,Hq,D] q.dtype, lse [T,Hq] fp32)
indexer_kl(q, k, lse, q_idx, k_idx, topk_idx, cu_seqlens, block_size=128, *, scale=None,
           index_scale=None, key_starts=None, key_lens=None, reduction="mean", deterministic=False)
    -> fp32 scalar
indexer_kl_dense(q, k, q_idx, k_idx, cu_seqlens, *, scale=None, index_scale=None, key_starts=None,
                 key_lens=None, lse=None, reduction="mean", deterministic=False) -> fp32 scalar
sparse_attention_and_kl(q, k, v, topk_idx, q_idx, k_idx, cu_seqlens, block_size=128, *, scale=None,
                        index_scale=None, key_starts=None, key_lens=None, reduction="mean",
                        deterministic=False) -> (out, lse, fp32 scalar)
    = sparse_attention(...) then indexer_kl(q.detach(), k.detach(), lse.detach(), ...), in one
    autograd node on Triton so the KL's key gradient rides along the attention backward.

Backend dispatch
----------------
Every op takes ``backend=`` ``auto`` | ``reference`` | ``triton`` (msa-train passes
``attention.kernels``); ``backend=None`` reads ``MSA_KERNELS_BACKEND`` (default ``auto``).
auto: CUDA tensors -> Triton, CPU tensors -> the reference. On CUDA the slow reference never runs
silently: without Triton installed, auto warns once, loudly (RuntimeWarning and the log), and runs
the reference; a Triton kernel module or entry point that is missing or fails to import raises.
``triton`` forces Triton even on CPU tensors (for ``TRITON_INTERPRET=1`` tests) and raises if it is
unavailable. ``reference`` always runs the reference (set it to silence the warning on purpose).
Tile choices: msa_kernels.tuning (one frozen dataclass per kernel family, passed explicitly).

Contract for the Triton modules (imported lazily; implement exactly these signatures)
------------------------------------------------------------------------------------
All tensors arrive already validated (shapes, devices, dtypes below), NOT necessarily contiguous:
call ``.contiguous()`` where a kernel needs it. ``layout`` is a :class:`msa_kernels.layout.VarlenLayout`
(device tensors q_starts/k_starts int64, q_lens/k_lens/pos_offsets int32, plus Python ints:
total_q, total_k, max_q_len, max_k_len, max_blocks(block_size)). Scales arrive resolved as floats.

msa_kernels.select.triton.select_blocks_triton(
        q_idx, k_idx, layout, *, block_size: int, topk: int, index_scale: float,
        force_sink: bool, local_window: int) -> torch.int32 [Hkv, T, topk]
    Same selection as the reference: local block in the last valid slot, -1 padding at the end,
    forced blocks (sink, window) before the ranked ones; the order of non-local slots may differ.
msa_kernels.attention.triton_fwd.sparse_attention_triton(
        q, k, v, topk_idx, layout, *, block_size: int, scale: float, deterministic: bool,
        check_ids: bool)
        -> (out [T, Hq, D] in q.dtype, lse [T, Hq] float32)
    A torch.autograd.Function wrapper (backward in triton_bwd) giving dq, dk, dv, and accepting a
    gradient on lse. Rows whose support is empty (all -1) give out = 0 and lse = -inf, and zero
    gradients.
msa_kernels.kl.triton.indexer_kl_triton(
        q, k, lse, q_idx, k_idx, topk_idx, layout, *, block_size: int, scale: float,
        index_scale: float, reduction: str, deterministic: bool) -> float32 scalar
msa_kernels.kl.fused.sparse_attention_kl_triton(
        q, k, v, topk_idx, q_idx, k_idx, layout, *, block_size, scale, index_scale, reduction,
        deterministic) -> (out, lse, float32 scalar)
msa_kernels.kl.triton.indexer_kl_dense_triton(
        q, k, q_idx, k_idx, layout, *, scale: float, index_scale: float, lse: Optional[Tensor],
        reduction: str, deterministic: bool) -> float32 scalar
    Both KL ops: autograd Functions returning gradients for q_idx and k_idx only (None for q, k, lse).
    reduction "sum" = sum over (token, group) of KL(P || Q); "mean" = that sum / (T * Hkv).
"""
from __future__ import annotations

import importlib
import logging
import os
import warnings
import weakref
from typing import Optional, Tuple

import torch

from .layout import VarlenLayout, cached_layout, check_tensor, make_layout

__all__ = [
    "select_blocks", "sparse_attention", "indexer_kl", "indexer_kl_dense", "sparse_attention_and_kl",
    "VarlenLayout", "make_layout", "backend_for",
]

_BACKENDS = ("auto", "reference", "triton")
_REDUCTIONS = ("mean", "sum")
_warned: set = set()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _backend_choice(backend: Optional[str] = None) -> str:
    if backend is not None:
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        return backend
    choice = os.environ.get("MSA_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if choice not in _BACKENDS:
        raise ValueError(f"MSA_KERNELS_BACKEND must be one of {_BACKENDS}, got {choice!r}")
    return choice


def backend_for(t: torch.Tensor, backend: Optional[str] = None) -> str:
    """'triton' or 'reference' for an op whose inputs live where ``t`` lives, given the op's
    ``backend`` argument (None: MSA_KERNELS_BACKEND, default auto; see the module docstring)."""
    choice = _backend_choice(backend)
    if choice != "auto":
        return choice
    if not t.is_cuda:
        return "reference"
    if _triton_available():
        return "triton"
    _warn_once("no-triton", "msa_kernels: Triton is not installed, so MSA runs the PyTorch reference on CUDA, "
                            "many times slower than the kernels. Install triton (pip install triton), or choose "
                            "the reference on purpose (msa-train: attention.kernels=reference; "
                            "elsewhere backend='reference' or MSA_KERNELS_BACKEND=reference).")
    return "reference"


def _warn_once(key: str, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    logging.getLogger(__name__).warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def _load_triton(module: str, fn: str):
    """The Triton entry point ``msa_kernels.<module>.<fn>``; a missing or broken one raises (no fallback
    to the reference: on CUDA that would be silently many times slower)."""
    full = f"{__name__}.{module}"
    try:
        mod = importlib.import_module(full)
    except ImportError as e:
        raise ImportError(f"msa_kernels: the Triton kernel module {full} failed to import ({e}); fix the "
                          f"installation, or run the slow PyTorch reference (msa-train: "
                          f"attention.kernels=reference; elsewhere backend='reference')") from e
    impl = getattr(mod, fn, None)
    if impl is None:
        raise ImportError(f"msa_kernels: {full} has no {fn}; the installed msa_kernels is incomplete")
    return impl


def _dispatch(anchor: torch.Tensor, module: str, fn: str, backend: Optional[str] = None):
    """The Triton entry point to run, or None for the reference."""
    if backend_for(anchor, backend) == "reference":
        return None
    if not anchor.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("the triton backend on CPU tensors needs TRITON_INTERPRET=1 (set before "
                           "importing triton); use backend 'auto' or 'reference' (msa-train: "
                           "attention.kernels) to run the reference")
    return _load_triton(module, fn)


def _scale(value: Optional[float], dim: int, name: str) -> float:
    if value is None:
        return dim ** -0.5
    value = float(value)
    if not 0.0 < value < float("inf"):
        raise ValueError(f"{name} must be a positive finite float, got {value}")
    return value


def _check_block_size(block_size: int) -> int:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return block_size


def _check_reduction(reduction: str) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


def _layout(cu_seqlens, key_starts, key_lens, total_q: int, total_k: int, device) -> VarlenLayout:
    if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the inputs are on {device}")
    return cached_layout(cu_seqlens, key_starts, key_lens, total_keys=total_k, total_queries=total_q)


def _check_main(q, k, name_q="q", name_k="k"):
    check_tensor(q, name_q, (None, None, None))
    t, hq, d = q.shape
    check_tensor(k, name_k, (None, None, d), device=q.device)
    hkv = k.shape[1]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"{name_q} heads ({hq}) must be a multiple of {name_k} heads ({hkv})")
    if k.dtype != q.dtype:
        raise TypeError(f"{name_k} dtype {k.dtype} must match {name_q} dtype {q.dtype}")
    return t, hq, hkv, d


def _check_value(v, q, k):
    check_tensor(v, "v", tuple(k.shape), device=q.device)
    if v.dtype != q.dtype:
        raise TypeError(f"v dtype {v.dtype} must match q dtype {q.dtype}")


def _sparse_kl_options(block_size, scale, index_scale, d: int, di: int, reduction, deterministic) -> dict:
    return dict(block_size=_check_block_size(block_size), scale=_scale(scale, d, "scale"),
                index_scale=_scale(index_scale, di, "index_scale"),
                reduction=_check_reduction(reduction), deterministic=bool(deterministic))


def _check_lse(lse, t: int, hq: int, device):
    check_tensor(lse, "lse", (t, hq), device=device)
    if lse.dtype != torch.float32:
        raise TypeError(f"lse must be float32 (as sparse_attention returns it), got {lse.dtype}")


def _check_index(q_idx, k_idx, hkv: Optional[int], t: Optional[int], tk: Optional[int], device):
    check_tensor(q_idx, "q_idx", (t, hkv, None), device=device)
    check_tensor(k_idx, "k_idx", (tk, q_idx.shape[2]), device=device)
    if k_idx.dtype != q_idx.dtype:
        raise TypeError(f"k_idx dtype {k_idx.dtype} must match q_idx dtype {q_idx.dtype}")
    return q_idx.shape[2]


def _check_topk(topk_idx, hkv: int, t: int, device):
    check_tensor(topk_idx, "topk_idx", (hkv, t, None), floating=False, device=device)
    if topk_idx.dtype != torch.int32:
        raise TypeError(f"topk_idx must have dtype torch.int32, got {topk_idx.dtype}")


# select_blocks outputs, by id: sparse_attention's Triton path skips validating these ids (a device
# sync per call) while the tensor is alive and unmodified; ids from anywhere else are checked.
_selected: dict = {}


def _mark_selected(topk_idx: torch.Tensor) -> torch.Tensor:
    key = id(topk_idx)
    _selected[key] = (weakref.ref(topk_idx, lambda _, key=key: _selected.pop(key, None)), topk_idx._version)
    return topk_idx


def _is_selected(topk_idx: torch.Tensor) -> bool:
    entry = _selected.get(id(topk_idx))
    return entry is not None and entry[0]() is topk_idx and entry[1] == topk_idx._version


def select_blocks(q_idx: torch.Tensor, k_idx: torch.Tensor, cu_seqlens: torch.Tensor,
                  block_size: int = 128, topk: int = 16, *, index_scale: Optional[float] = None,
                  key_starts: Optional[torch.Tensor] = None, key_lens: Optional[torch.Tensor] = None,
                  force_sink: bool = False, local_window: int = 0,
                  backend: Optional[str] = None) -> torch.Tensor:
    """Per-token top-k key blocks of each index group -> int32 [Hkv, T, topk], -1 padded.

    Block score = max over the block's visible keys (j <= i) of <q_idx[i,r], k_idx[j]> * index_scale.
    The local block (position // block_size) is always selected, counts toward ``topk`` and sits in
    the last valid slot; valid count = min(topk, visible blocks). Ablation C.2 of the paper:
    ``force_sink`` also forces block 0 and ``local_window = w`` forces the w blocks before the local
    one; forced blocks count toward ``topk`` (when they exceed it, the sink wins, then the nearest
    window blocks) and come first; the remaining slots rank the other visible blocks by score
    (descending; ties -> lower block id).
    """
    check_tensor(q_idx, "q_idx", (None, None, None))
    t, di = q_idx.shape[0], q_idx.shape[2]
    _check_index(q_idx, k_idx, None, None, None, q_idx.device)
    block_size = _check_block_size(block_size)
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    if not isinstance(local_window, int) or isinstance(local_window, bool) or local_window < 0:
        raise ValueError(f"local_window must be an int >= 0, got {local_window!r}")
    index_scale = _scale(index_scale, di, "index_scale")
    layout = _layout(cu_seqlens, key_starts, key_lens, t, k_idx.shape[0], q_idx.device)
    opts = dict(block_size=block_size, topk=topk, index_scale=index_scale,
                force_sink=bool(force_sink), local_window=local_window)
    impl = _dispatch(q_idx, "select.triton", "select_blocks_triton", backend)
    if impl is None:
        from .select.naive import select_blocks_ref
        impl = select_blocks_ref
    return _mark_selected(impl(q_idx, k_idx, layout, **opts))


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk_idx: torch.Tensor,
                     cu_seqlens: torch.Tensor, block_size: int = 128, *, scale: Optional[float] = None,
                     key_starts: Optional[torch.Tensor] = None, key_lens: Optional[torch.Tensor] = None,
                     deterministic: bool = False,
                     backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention of every head of group r over the tokens j <= i of its selected blocks.

    Returns (out [T, Hq, D] in q.dtype, lse [T, Hq] float32, natural log); autograd for q, k, v,
    including a gradient arriving on lse (d lse / d s = p). Ids of -1 are ignored, as are ids of
    blocks after the query's local block; a row with no visible selected token gives out = 0,
    lse = -inf. The Triton path trusts the ids (select_blocks output); the reference checks them.
    """
    t, _, hkv, d = _check_main(q, k)
    _check_value(v, q, k)
    _check_topk(topk_idx, hkv, t, q.device)
    block_size = _check_block_size(block_size)
    scale = _scale(scale, d, "scale")
    layout = _layout(cu_seqlens, key_starts, key_lens, t, k.shape[0], q.device)
    impl = _dispatch(q, "attention.triton_fwd", "sparse_attention_triton", backend)
    if impl is None:
        from .attention.naive import sparse_attention_ref
        return sparse_attention_ref(q, k, v, topk_idx, layout, block_size=block_size, scale=scale,
                                    deterministic=bool(deterministic))
    return impl(q, k, v, topk_idx, layout, block_size=block_size, scale=scale,
                deterministic=bool(deterministic), check_ids=not _is_selected(topk_idx))


def indexer_kl(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, q_idx: torch.Tensor,
               k_idx: torch.Tensor, topk_idx: torch.Tensor, cu_seqlens: torch.Tensor,
               block_size: int = 128, *, scale: Optional[float] = None,
               index_scale: Optional[float] = None, key_starts: Optional[torch.Tensor] = None,
               key_lens: Optional[torch.Tensor] = None, reduction: str = "mean",
               deterministic: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """KL(P || Q) on the selected support S(i, r), reduced over (token, group).

    Teacher P = mean over the G heads of group r of exp(q.k * scale - lse) on S(i, r) (detached);
    student Q = softmax over S(i, r) of q_idx.k_idx * index_scale. Gradients reach q_idx and k_idx
    only. reduction="mean" divides the sum by T * Hkv (T = query rows of this call); use "sum" to
    build a global mean across context-parallel ranks. A (token, group) with an empty support (all
    ids -1) contributes 0 but still counts in the mean's denominator.
    """
    t, hq, hkv, d = _check_main(q, k)
    _check_lse(lse, t, hq, q.device)
    _check_index(q_idx, k_idx, hkv, t, k.shape[0], q.device)
    _check_topk(topk_idx, hkv, t, q.device)
    opts = _sparse_kl_options(block_size, scale, index_scale, d, q_idx.shape[2], reduction, deterministic)
    layout = _layout(cu_seqlens, key_starts, key_lens, t, k.shape[0], q.device)
    impl = _dispatch(q, "kl.triton", "indexer_kl_triton", backend)
    if impl is None:
        from .kl.naive import indexer_kl_ref
        impl = indexer_kl_ref
    return impl(q, k, lse, q_idx, k_idx, topk_idx, layout, **opts)


def indexer_kl_dense(q: torch.Tensor, k: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor,
                     cu_seqlens: torch.Tensor, *, scale: Optional[float] = None,
                     index_scale: Optional[float] = None, key_starts: Optional[torch.Tensor] = None,
                     key_lens: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
                     reduction: str = "mean", deterministic: bool = False,
                     backend: Optional[str] = None) -> torch.Tensor:
    """Warmup-stage KL: like :func:`indexer_kl` with support = every visible key j <= i.

    The teacher is full causal attention; ``lse`` [T, Hq] fp32 of that attention may be passed
    (e.g. from the dense main branch), else it is computed. Memory stays O(T x chunk).
    """
    t, hq, hkv, d = _check_main(q, k)
    if lse is not None:
        _check_lse(lse, t, hq, q.device)
    _check_index(q_idx, k_idx, hkv, t, k.shape[0], q.device)
    opts = dict(scale=_scale(scale, d, "scale"),
                index_scale=_scale(index_scale, q_idx.shape[2], "index_scale"),
                lse=lse, reduction=_check_reduction(reduction), deterministic=bool(deterministic))
    layout = _layout(cu_seqlens, key_starts, key_lens, t, k.shape[0], q.device)
    impl = _dispatch(q, "kl.triton", "indexer_kl_dense_triton", backend)
    if impl is None:
        from .kl.naive import indexer_kl_dense_ref
        impl = indexer_kl_dense_ref
    return impl(q, k, q_idx, k_idx, layout, **opts)


def sparse_attention_and_kl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk_idx: torch.Tensor,
                            q_idx: torch.Tensor, k_idx: torch.Tensor, cu_seqlens: torch.Tensor,
                            block_size: int = 128, *, scale: Optional[float] = None,
                            index_scale: Optional[float] = None, key_starts: Optional[torch.Tensor] = None,
                            key_lens: Optional[torch.Tensor] = None, reduction: str = "mean",
                            deterministic: bool = False, backend: Optional[str] = None
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sparse stage's main branch and KL together: :func:`sparse_attention` (autograd to q, k, v)
    and :func:`indexer_kl` of its own probabilities (teacher detached; autograd to q_idx, k_idx).

    Returns (out, lse, kl). Same values and gradients as the two calls
    ``out, lse = sparse_attention(...)``; ``indexer_kl(q.detach(), k.detach(), lse.detach(), ...)``;
    on Triton one autograd node computes the KL's key gradient inside the attention backward, which
    already recomputes every head's probabilities (the KL teacher), instead of a second pass.
    """
    t, hq, hkv, d = _check_main(q, k)
    _check_value(v, q, k)
    _check_index(q_idx, k_idx, hkv, t, k.shape[0], q.device)
    _check_topk(topk_idx, hkv, t, q.device)
    opts = _sparse_kl_options(block_size, scale, index_scale, d, q_idx.shape[2], reduction, deterministic)
    block_size = opts["block_size"]
    layout = _layout(cu_seqlens, key_starts, key_lens, t, k.shape[0], q.device)
    impl = _dispatch(q, "kl.fused", "sparse_attention_kl_triton", backend)
    if impl is not None:
        return impl(q, k, v, topk_idx, q_idx, k_idx, layout, check_ids=not _is_selected(topk_idx), **opts)
    from .attention.naive import sparse_attention_ref
    from .kl.naive import indexer_kl_ref

    out, lse = sparse_attention_ref(q, k, v, topk_idx, layout, block_size=block_size, scale=opts["scale"],
                                    deterministic=opts["deterministic"])
    kl = indexer_kl_ref(q.detach(), k.detach(), lse.detach(), q_idx, k_idx, topk_idx, layout, **opts)
    return out, lse, kl
