"""Per-layer indexer-KL tracker, read by the trainer for train/indexer_kl and indexer_kl/layer_XX.

Each MSA layer records its KL value (detached) once per forward. A layer's local value is its
share of the micro-batch's global mean (local sum / global token-group count), so the sum over TP
and CP ranks is the global KL of the micro-batch. ``get_kl_metrics`` reduces across TP+CP (sum),
PP (layers live on one stage), DP (average) and divides by the number of micro-batches seen.
Every rank must call it (it is collective).

Values are kept as tensors and read only in ``get_kl_metrics``: the sparse stage's deferred KL
(msa_kernels.sparse_attention_and_kl(defer_kl=True)) is written by the backward pass, so the
tracker must be read after the step's backward (as the trainer's logging does).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

_VALUES: Dict[int, List[Tuple[torch.Tensor, float]]] = {}
_STATE = {"num_layers": 0}


def set_num_layers(num_layers: int) -> None:
    """Called by build_model: every rank needs the same vector length for the collectives."""
    _STATE["num_layers"] = max(_STATE["num_layers"], int(num_layers))


def record(layer_number: int, value: torch.Tensor, scale: float = 1.0) -> None:
    """Record one micro-batch's local KL of a layer (1-based global layer number) as
    ``value * scale``; the tensor is read later (see the module docstring)."""
    _STATE["num_layers"] = max(_STATE["num_layers"], layer_number)
    _VALUES.setdefault(layer_number, []).append((value.detach().reshape(()), float(scale)))


def clear() -> None:
    _VALUES.clear()


def _groups():
    from megatron.core import parallel_state as ps

    if not (torch.distributed.is_initialized() and ps.model_parallel_is_initialized()):
        return None
    return (
        ps.get_tensor_and_context_parallel_group(),
        ps.get_pipeline_model_parallel_group(),
        ps.get_data_parallel_group(),
    )


def _device() -> torch.device:
    if _VALUES:
        return next(iter(_VALUES.values()))[0][0].device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def get_kl_metrics(reset: bool = True) -> Dict[int, float]:
    """{layer_number (1-based): KL averaged over micro-batches and DP}, for layers that ran."""
    n = _STATE["num_layers"]
    if n == 0:
        return {}
    device = _device()
    values = torch.zeros(n, dtype=torch.float32, device=device)
    counts = torch.zeros(n, dtype=torch.float32, device=device)
    for layer, recs in _VALUES.items():
        values[layer - 1] = torch.stack([v.float() * s for v, s in recs]).sum().to(device)
        counts[layer - 1] = float(len(recs))
    groups = _groups()
    if groups is not None:
        tpcp, pp, dp = groups
        torch.distributed.all_reduce(values, group=tpcp)
        stacked = torch.stack([values, counts])
        torch.distributed.all_reduce(stacked, group=pp)
        values, counts = stacked[0], stacked[1]
        torch.distributed.all_reduce(values, group=dp)
        values = values / torch.distributed.get_world_size(group=dp)
    if reset:
        clear()
    return {i + 1: float(values[i] / counts[i]) for i in range(n) if counts[i] > 0}


def mean_kl(metrics: Dict[int, float]) -> float:
    """train/indexer_kl: mean over MSA layers of get_kl_metrics()."""
    return sum(metrics.values()) / len(metrics) if metrics else float("nan")
