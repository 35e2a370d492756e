"""Append-only jsonl metrics file: the run's own record, independent of wandb.

One JSON object per line: {"step": int, "stage": str|null, "time": unix seconds, <metric key>: value}.
A resumed run appends to the same file, so steps done after the last checkpoint of the crashed job
appear twice; ``read_metrics(..., dedupe=True)`` keeps the LAST record of each step (the one the
resumed run produced, which the model that continues actually saw).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Iterable, Mapping, Optional

METRICS_FILENAME = "metrics.jsonl"


def _scalar(v: Any) -> Any:
    """Plain JSON value for tensors / numpy scalars; other values unchanged."""
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return v
    try:
        return float(v)
    except (TypeError, ValueError):
        raise TypeError(f"metric value {v!r} ({type(v).__name__}) is not a number or string") from None


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class JsonlWriter:
    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # Line-buffered append: each record is on disk once written, and a killed job leaves at
        # most one partial last line, which read_metrics skips.
        self._f = open(path, "a", buffering=1, encoding="utf-8")
        if self._f.tell() > 0 and not _ends_with_newline(path):
            # Terminate a killed job's partial line so the first new record stays readable.
            self._f.write("\n")

    def write(self, step: int, metrics: Mapping[str, Any], stage: Optional[str] = None) -> None:
        rec = {"step": int(step), "stage": stage, "time": time.time()}
        for k, v in metrics.items():
            if k in rec:
                raise ValueError(f"metric key {k!r} collides with a reserved jsonl field")
            rec[k] = _scalar(v)
        self._f.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def iter_records(path: str) -> Iterable[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                # A job killed mid-write leaves a truncated line: skip it, keep the rest.
                continue


def read_metrics(path: str, dedupe: bool = True) -> list[dict]:
    """All records, ordered by step; with dedupe the last record written for each step wins."""
    recs = list(iter_records(path))
    if not dedupe:
        return recs
    by_step: dict[int, dict] = {}
    for r in recs:
        by_step[int(r["step"])] = r
    return [by_step[s] for s in sorted(by_step)]


def series(records: Iterable[Mapping], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, skipping records without it and non-finite values."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys
