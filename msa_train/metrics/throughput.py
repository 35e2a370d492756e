"""Training throughput: FLOPs per token -> tokens/s, TFLOP/s per GPU and MFU; peak memory.

The FLOP model itself (MoE on ACTIVE parameters, attention on the pairs actually computed, the
docs/MSA.md attention formulas) belongs to the model package: ``msa_train.model.flops``. This module
only turns its per-token figure into rates, so every consumer (trainer logs, dry run, throughput
benchmark) reports the same numbers.

API
    fpt = FlopsPerToken.for_model(model_cfg, attn_cfg, seq_len, stage)   # stage "dense" | "sparse"
    meter = ThroughputMeter(num_gpus=world_size, flops=fpt, peak_tflops=resolve_peak_tflops(cfg.peak_tflops))
    metrics.update(meter.rates(tokens=global_tokens_in_interval, seconds=interval_wall_s))
``rates`` returns perf/tokens_per_sec_per_gpu, perf/tflops_per_gpu, perf/dense_equiv_tflops_per_gpu and
(only with a known peak) perf/mfu.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from msa_train.metrics import keys

STAGES = ("dense", "sparse")


def _model_flops_fn():
    # Imported lazily: msa_train.model pulls in Megatron, which the logging path must not need.
    try:
        from msa_train.model.flops import flops_per_token
    except ImportError as e:  # pragma: no cover - depends on the model package being installed
        raise ImportError(
            "msa_train.model.flops.flops_per_token is required to count FLOPs "
            f"(model package not importable: {e})") from e
    return flops_per_token


@dataclasses.dataclass(frozen=True)
class FlopsPerToken:
    """Training (forward + backward) FLOPs per token.

    actual: what this stage computes (sparse stage: attention on the selected pairs).
    dense_equiv: the same backbone with full causal attention in every layer and no index
    branch, at the same length.
    """

    actual: float
    dense_equiv: float

    def __post_init__(self):
        if not (self.actual > 0 and self.dense_equiv > 0):
            raise ValueError(f"FLOPs per token must be > 0, got actual={self.actual}, "
                             f"dense_equiv={self.dense_equiv}")

    @classmethod
    def for_model(cls, model_cfg: Any, attn_cfg: Any, seq_len: int, stage: str) -> "FlopsPerToken":
        """Count with the model package's FLOP model for one stage of the two-stage schedule.

        actual: mode "dense" for the warmup (full attention + dense KL on MSA layers) or
        "sparse"; dense_equiv: mode "dense_equivalent" (same backbone, full attention everywhere,
        no index branch), the baseline the MSA speedup is quoted against.
        """
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        fn = _model_flops_fn()
        actual = float(fn(model_cfg, attn_cfg, seq_len, stage))
        dense = float(fn(model_cfg, attn_cfg, seq_len, "dense_equivalent"))
        return cls(actual=actual, dense_equiv=dense)


class ThroughputMeter:
    """Turns (tokens, seconds) of one logging interval into per-GPU rates.

    num_gpus is the whole world size: tokens are counted globally (all data-parallel replicas), and
    TP/PP/CP/EP ranks share the work on the same tokens, so per-GPU = global / world size.
    """

    def __init__(self, num_gpus: int, flops: Optional[FlopsPerToken] = None,
                 peak_tflops: Optional[float] = None):
        if num_gpus <= 0:
            raise ValueError(f"num_gpus must be > 0, got {num_gpus}")
        if peak_tflops is not None and peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be > 0 or None, got {peak_tflops}")
        self.num_gpus = num_gpus
        self.flops = flops
        self.peak_tflops = peak_tflops

    def set_flops(self, flops: Optional[FlopsPerToken]) -> None:
        """Switch the FLOP model (at the warmup -> sparse stage switch)."""
        self.flops = flops

    def rates(self, tokens: int, seconds: float) -> dict[str, float]:
        if seconds <= 0:
            raise ValueError(f"seconds must be > 0, got {seconds}")
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        tps = tokens / seconds / self.num_gpus
        out = {keys.TOKENS_PER_SEC_PER_GPU: tps}
        if self.flops is None:
            return out
        tflops = tps * self.flops.actual / 1e12
        out[keys.TFLOPS_PER_GPU] = tflops
        out[keys.DENSE_EQUIV_TFLOPS_PER_GPU] = tps * self.flops.dense_equiv / 1e12
        if self.peak_tflops is not None:
            out[keys.MFU] = tflops / self.peak_tflops
        return out


def max_allocated_gib(reset: bool = True) -> Optional[float]:
    """Peak CUDA memory of this process since the last reset, in GiB; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    gib = torch.cuda.max_memory_allocated() / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return gib
