"""Per-layer indexer-KL tracker, read by the trainer for train/indexer_kl and indexer_kl/layer_XX.

Each MSA layer adds its KL value (detached) once per forward. A layer's local value is its share
of the micro-batch's global mean (local sum / global token-group count), so the sum over TP and
CP ranks is the global KL of the micro-batch. ``get_kl_metrics`` reduces across TP+CP (sum),
PP (layers live on one stage), DP (average) and divides by the number of micro-batches seen.
Every rank must call it (it is collective).
"""

from __future__ import annotations

from typing import Dict

import torch

_VALUES: Dict[int, torch.Tensor] = {}
_COUNTS: Dict[int, int] = {}
_STATE = {"num_layers": 0}


def set_num_layers(num_layers: int) -> None:
    """Called by build_model: every rank needs the same vector length for the collectives."""
    _STATE["num_layers"] = max(_STATE["num_layers"], int(num_layers))


def record(layer_number: int, value: torch.Tensor) -> None:
    """Add one micro-batch's local KL value for a layer (1-based global layer number)."""
    _STATE["num_layers"] = max(_STATE["num_layers"], layer_number)
    v = value.detach().float().reshape(())
    _VALUES[layer_number] = _VALUES[layer_number] + v if layer_number in _VALUES else v.clone()
    _COUNTS[layer_number] = _COUNTS.get(layer_number, 0) + 1


def clear() -> None:
    _VALUES.clear()
    _COUNTS.clear()


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
        return next(iter(_VALUES.values())).device
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
    for layer, v in _VALUES.items():
        values[layer - 1] = v.to(device)
        counts[layer - 1] = float(_COUNTS[layer])
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
