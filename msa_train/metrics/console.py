"""The one console line printed per log interval.

    print(console_line(step, total_steps, metrics, stage="sparse"))
    [sparse] step 1200/50000 2.40% | tok 1.26B | loss 2.3456 | kl 1.234e-02 | lr 3.00e-04 |
    gnorm 0.870 | 12.3K tok/s/gpu | 412.3 TFLOP/s/gpu mfu 41.7% | mem 61.2GiB | eta 3h07m

Missing metrics are left out rather than printed as zeros (e.g. no KL for a dense model, no MFU
on an unknown card).
"""
from __future__ import annotations

from typing import Mapping, Optional

from msa_train.metrics import keys
from msa_train.metrics.progress import format_count, format_duration


def console_line(step: int, total_steps: Optional[int], metrics: Mapping[str, float],
                 stage: Optional[str] = None) -> str:
    m = metrics
    head = f"[{stage}] " if stage else ""
    head += f"step {step}/{total_steps}" if total_steps else f"step {step}"
    if keys.PCT in m:
        head += f" {m[keys.PCT]:.2f}%"
    parts = [head]
    if keys.CONSUMED_TOKENS in m:
        parts.append(f"tok {format_count(m[keys.CONSUMED_TOKENS])}")
    if keys.LM_LOSS in m:
        parts.append(f"loss {m[keys.LM_LOSS]:.4f}")
    if keys.INDEXER_KL in m:
        parts.append(f"kl {m[keys.INDEXER_KL]:.3e}")
    if keys.LR in m:
        parts.append(f"lr {m[keys.LR]:.2e}")
    if keys.GRAD_NORM in m:
        parts.append(f"gnorm {m[keys.GRAD_NORM]:.3f}")
    if keys.TOKENS_PER_SEC_PER_GPU in m:
        parts.append(f"{format_count(m[keys.TOKENS_PER_SEC_PER_GPU])} tok/s/gpu")
    if keys.TFLOPS_PER_GPU in m:
        t = m[keys.TFLOPS_PER_GPU]
        perf = f"{t:.1f} TFLOP/s/gpu" if t >= 10 else f"{t:.3g} TFLOP/s/gpu"
        if keys.MFU in m:
            perf += f" mfu {100 * m[keys.MFU]:.1f}%"
        parts.append(perf)
    if keys.MAX_ALLOCATED_GIB in m:
        parts.append(f"mem {m[keys.MAX_ALLOCATED_GIB]:.1f}GiB")
    if keys.PCT in m or keys.ETA in m:
        parts.append(f"eta {format_duration(m.get(keys.ETA))}")
    return " | ".join(parts)
