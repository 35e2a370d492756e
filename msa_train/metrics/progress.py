"""Run progress: the run's position (Progress: step, consumed samples, stage; saved with every
checkpoint) and the meter derived from it (RunProgress: consumed tokens, percent done and ETA).

    progress = RunProgress(total_tokens=cfg_total, start_tokens=resumed_consumed_tokens)
    metrics.update(progress.update(consumed_tokens))   # progress/consumed_tokens, progress/pct, progress/eta

The ETA uses the token rate over a sliding window of recent updates, not the rate since start:
the first steps (compilation, allocator warm-up) and the dense -> sparse stage switch change the
speed, and a window forgets both within a few log intervals. Before two updates exist it is None.
"""
from __future__ import annotations

import collections
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Optional

from msa_train.metrics import keys


@dataclass
class Progress:
    iteration: int = 0  # optimizer steps completed (global, across stages)
    consumed_samples: int = 0  # global samples consumed: the data position
    stage: str = "warmup"

    def advance(self, samples: int) -> None:
        self.iteration += 1
        self.consumed_samples += samples

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Progress":
        return cls(iteration=int(data.get("iteration", 0)),
                   consumed_samples=int(data.get("consumed_samples", 0)),
                   stage=str(data.get("stage", "warmup")))


class RunProgress:
    def __init__(self, total_tokens: int, start_tokens: int = 0, window: int = 20,
                 clock: Callable[[], float] = time.monotonic):
        if total_tokens <= 0:
            raise ValueError(f"total_tokens must be > 0 (the run's token budget), got {total_tokens}")
        if not 0 <= start_tokens:
            raise ValueError(f"start_tokens must be >= 0, got {start_tokens}")
        if window < 2:
            raise ValueError(f"window must be >= 2 updates, got {window}")
        self.total_tokens = int(total_tokens)
        self._clock = clock
        # (time, consumed tokens); the starting point counts as the first sample.
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=window)
        self._samples.append((clock(), int(start_tokens)))
        self.consumed_tokens = int(start_tokens)

    @property
    def pct(self) -> float:
        return min(100.0, 100.0 * self.consumed_tokens / self.total_tokens)

    def tokens_per_sec(self) -> Optional[float]:
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        if t1 <= t0 or n1 <= n0:
            return None
        return (n1 - n0) / (t1 - t0)

    def eta_seconds(self) -> Optional[float]:
        remaining = max(0, self.total_tokens - self.consumed_tokens)
        if remaining == 0:
            return 0.0
        rate = self.tokens_per_sec()
        return None if rate is None else remaining / rate

    def update(self, consumed_tokens: int) -> dict[str, float]:
        """Record the global consumed-token count after a step; returns the progress/* metrics."""
        if consumed_tokens < self.consumed_tokens:
            raise ValueError(f"consumed_tokens went backwards: {consumed_tokens} < {self.consumed_tokens}")
        self.consumed_tokens = int(consumed_tokens)
        self._samples.append((self._clock(), self.consumed_tokens))
        out = {keys.CONSUMED_TOKENS: self.consumed_tokens, keys.PCT: self.pct}
        eta = self.eta_seconds()
        if eta is not None:
            out[keys.ETA] = eta
        return out


def format_duration(seconds: Optional[float]) -> str:
    """Compact human duration: 45s, 12m05s, 3h07m, 2d04h; '?' when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def format_count(n: Optional[float]) -> str:
    """Token counts as 1.23K / 4.56M / 7.89B / 1.23T."""
    if n is None:
        return "?"
    n = float(n)
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
