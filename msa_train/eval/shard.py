"""Data-parallel msa-eval under torchrun: every rank holds the whole model (tensor parallel 1) and
scores its share of the sequences and examples; the sums are all-reduced, so every rank ends with
the same results and rank 0 writes them. Without torchrun it is one rank and nothing changes.
"""
from __future__ import annotations

from typing import List, Sequence, TypeVar

import numpy as np
import torch

T = TypeVar("T")


def rank_world() -> tuple:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard(items: Sequence[T]) -> List[T]:
    """This rank's items: every world-th, starting at the rank (the same split on every rank)."""
    rank, world = rank_world()
    return list(items)[rank::world]


def all_sum(values, device) -> np.ndarray:
    """Element-wise float64 sum over ranks of an array (or list) of the same shape on every rank."""
    arr = np.asarray(values, dtype=np.float64)
    _, world = rank_world()
    if world == 1:
        return arr
    t = torch.from_numpy(arr.copy()).to(device)
    torch.distributed.all_reduce(t)
    return t.cpu().numpy()
