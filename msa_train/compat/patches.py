"""Module-level patches that let Megatron-Core 0.16 run on CPU.

Patches are module-level (factories, Tensor methods, module attributes) rather than a
TorchFunctionMode: a mode is not active inside autograd's backward, so activation recompute
would escape it.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import torch

_LOCK = threading.Lock()
_APPLIED = False
_ALWAYS_APPLIED = False

# Factories that take a ``device=`` keyword and are called with "cuda" by Megatron.
_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint",
    "as_tensor", "empty_like", "zeros_like", "ones_like", "full_like", "randn_like",
    "rand_like", "linspace", "eye", "empty_strided",
)


def is_applied() -> bool:
    return _APPLIED


def _is_cuda_device(device: Any) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _fix_kwargs(kwargs: dict) -> dict:
    if _is_cuda_device(kwargs.get("device")):
        kwargs["device"] = "cpu"
    # Pinned host memory needs a CUDA context.
    if kwargs.get("pin_memory"):
        kwargs["pin_memory"] = False
    return kwargs


def _wrap_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **_fix_kwargs(kwargs))

    wrapper._msa_compat = True
    return wrapper


def _patch_tensor_methods() -> None:
    orig_to = torch.Tensor.to

    @functools.wraps(orig_to)
    def to(self, *args, **kwargs):
        if args and _is_cuda_device(args[0]):
            args = ("cpu",) + args[1:]
        _fix_kwargs(kwargs)
        kwargs.pop("pin_memory", None)
        return orig_to(self, *args, **kwargs)

    def cuda(self, *args, **kwargs):
        return self

    def pin_memory(self, *args, **kwargs):
        return self

    def record_stream(self, *args, **kwargs):
        return None

    def _new(name):
        orig = getattr(torch.Tensor, name)

        @functools.wraps(orig)
        def new(self, *args, **kwargs):
            return orig(self, *args, **_fix_kwargs(kwargs))

        return new

    for name in ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor"):
        setattr(torch.Tensor, name, _new(name))

    # Megatron's optimizers dispatch on param.type() == 'torch.cuda.FloatTensor' (and Half/BFloat16).
    # Only Parameters report the CUDA type name; plain tensors are untouched.
    orig_type = torch.Tensor.type

    def param_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and not self.is_cuda:
            return orig_type(self).replace("torch.", "torch.cuda.", 1)
        return orig_type(self, dtype, non_blocking, **kwargs)

    torch.nn.Parameter.type = param_type
    torch.Tensor.to = to
    torch.Tensor.cuda = cuda
    torch.Tensor.pin_memory = pin_memory
    torch.Tensor.record_stream = record_stream
    torch.nn.Module.cuda = lambda self, *a, **k: self


class _DummyStream:
    """Stands in for torch.cuda.Stream: all work on CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        return None

    def wait_event(self, *args, **kwargs):
        return None

    def record_event(self, event=None):
        return event if event is not None else _DummyEvent()

    def synchronize(self):
        return None

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _DummyEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        return None

    def wait(self, *args, **kwargs):
        return None

    def synchronize(self):
        return None

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _NullContext:
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.Stream = _DummyStream
    cuda.Event = _DummyEvent
    cuda.current_stream = lambda *a, **k: _DummyStream()
    cuda.default_stream = lambda *a, **k: _DummyStream()
    cuda.stream = _NullContext
    cuda.set_stream = lambda *a, **k: None
    cuda.set_device = lambda *a, **k: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    # The "CUDA" RNG becomes the CPU default generator, so Megatron's RNG tracker forks the
    # generator that CPU dropout/init actually use.
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # Not torch.manual_seed: it calls torch.cuda.manual_seed_all, which must stay a lazy no-op.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.random.manual_seed = cuda.manual_seed
    for name in ("range_push", "range_pop", "mark"):
        setattr(cuda.nvtx, name, lambda *a, **k: None)


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def _get_state(device="cuda", clone=False, graph_safe=False):
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def _set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = _get_state
    mrandom._set_cuda_rng_state = _set_state


def _patch_clip_grads() -> None:
    """clip_grad_by_total_norm_fp32 asserts grad.type() == 'torch.cuda.FloatTensor'."""
    from megatron.core.optimizer import clip_grads, optimizer as moptimizer
    from megatron.core.utils import to_local_if_dtensor

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        grads = []
        for param in parameters:
            grad = param.decoupled_grad if use_decoupled_grad else param.grad
            if grad is not None:
                if grad.dtype not in (torch.float32, torch.bfloat16):
                    raise TypeError(f"clip_grads: unsupported grad dtype {grad.dtype}")
                grads.append(to_local_if_dtensor(grad).detach())
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0 and grads:
            torch._foreach_mul_(grads, clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    moptimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


def _patch_moe_split_sizes() -> None:
    """gloo's all_to_all needs host ints for split sizes; CPU tensors are never 'moved'."""
    import numpy as np

    from megatron.core.transformer.moe import moe_utils

    orig = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(orig)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.detach().numpy().astype(np.int64) if as_numpy else tensor
        return orig(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    from megatron.core.transformer.moe import token_dispatcher

    if hasattr(token_dispatcher, "maybe_move_tensor_to_cpu"):
        token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_uneven_collectives() -> None:
    """gloo has no uneven all_gather / reduce_scatter (MoE with expert TP > 1): pad, or reduce
    the whole tensor and keep this rank's rows."""
    from megatron.core.tensor_parallel import mappings

    orig_gather = mappings._gather_along_first_dim
    orig_rs = mappings._reduce_scatter_along_first_dim

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return orig_gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        longest = max(sizes)
        padded = input_.new_zeros((longest,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return orig_rs(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        sizes = [int(n) for n in input_split_sizes]
        start = sum(sizes[: group.rank()])
        return total[start : start + sizes[group.rank()]].clone()

    mappings._gather_along_first_dim = gather
    mappings._reduce_scatter_along_first_dim = reduce_scatter


def apply_always() -> None:
    """Fixes needed on every device when TransformerEngine is absent (idempotent)."""
    global _ALWAYS_APPLIED
    with _LOCK:
        if _ALWAYS_APPLIED:
            return
        from megatron.core.transformer.moe import moe_utils

        # Without TE the import fails before te_general_gemm is bound, and the router's
        # `if te_general_gemm is not None` raises NameError.
        if not hasattr(moe_utils, "te_general_gemm"):
            moe_utils.te_general_gemm = None
        _ALWAYS_APPLIED = True


def apply() -> None:
    """Make Megatron-Core usable on CPU; a no-op (except :func:`apply_always`) with CUDA."""
    global _APPLIED
    apply_always()
    if torch.cuda.is_available():
        return
    with _LOCK:
        if _APPLIED:
            return
        for name in _FACTORIES:
            fn = getattr(torch, name)
            if not getattr(fn, "_msa_compat", False):
                setattr(torch, name, _wrap_factory(fn))
        _patch_tensor_methods()
        _patch_torch_cuda()
        _patch_megatron_rng()
        _patch_clip_grads()
        _patch_moe_split_sizes()
        _patch_uneven_collectives()
        _APPLIED = True
