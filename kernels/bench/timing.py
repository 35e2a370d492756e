"""Timing and the run's time budget."""
from __future__ import annotations

import time
from typing import Callable

import torch

__all__ = ["time_ms", "Budget"]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], *, budget_ms: float = 200.0, min_reps: int = 3, device="cuda") -> float:
    """Median wall time in ms of ``fn`` (CUDA events on CUDA, perf_counter elsewhere) after one warmup
    call (which also compiles). Calls slower than ``budget_ms`` run once more and report that call."""
    cuda = torch.device(device).type == "cuda"

    def once() -> float:
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            return start.elapsed_time(stop)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    fn()  # warmup / compile
    _sync(device)
    est = max(once(), 1e-3)
    if est >= budget_ms:
        return est
    reps = int(max(min_reps, min(100, budget_ms / est)))
    times = sorted(once() for _ in range(reps))
    return times[len(times) // 2]


class Budget:
    """Wall-clock budget of a bench run: work items are skipped (and reported so) once it is spent."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.start = time.time()

    def elapsed(self) -> float:
        return time.time() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def spent(self) -> bool:
        return self.left() <= 0
