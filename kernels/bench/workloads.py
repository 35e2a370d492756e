"""Real packed training workloads: 192K-token packs and one context-parallel rank's share of them.

The packs' document boundaries (cu_seqlens) come from MiniMax-AI/MSA
``datas/training/real/cp16_192k_cases_v1.jsonl`` (MIT License, Copyright (c) 2026 MiniMax); a few of
them are kept in data/minimax_cp16_192k_packs.json with their case ids. Two ways to run a pack:
  whole     all 196,608 tokens on one GPU as packed varlen (one fragment per document);
  CP share  the queries one of 16 context-parallel ranks owns: the pack is cut into 1,024-token
            chunks, dealt to ranks greedily by causal work (heaviest chunk first to the least loaded
            rank with room; 12 chunks each), and the rank's queries attend to the gathered keys of
            their documents (each document's prefix up to the rank's last query in it).
"""
from __future__ import annotations

import heapq
import json
import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

__all__ = ["PACKS_FILE", "Pack", "load_packs", "chunk_work", "partition_chunks", "CPShare", "cp_share"]

PACKS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "minimax_cp16_192k_packs.json")


@dataclass(frozen=True)
class Pack:
    case_id: int
    cu_seqlens: Tuple[int, ...]

    @property
    def num_docs(self) -> int:
        return len(self.cu_seqlens) - 1

    @property
    def total(self) -> int:
        return self.cu_seqlens[-1]


def load_packs(path: str = PACKS_FILE) -> List[Pack]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    packs = []
    for case in data["cases"]:
        cu = tuple(int(x) for x in case["cu_seqlens"])
        if len(cu) < 2 or cu[0] != 0 or any(b <= a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"{path}: case {case.get('case_id')} has invalid cu_seqlens")
        packs.append(Pack(int(case["case_id"]), cu))
    return packs


def chunk_work(cu: Sequence[int], chunk: int) -> List[int]:
    """Causal query-key pairs of each ``chunk``-token chunk of the pack (documents never see each other)."""
    work = []
    for c0 in range(0, cu[-1], chunk):
        c1 = c0 + chunk
        area = 0
        for d0, d1 in zip(cu, cu[1:]):
            a, b = max(c0, d0) - d0, min(c1, d1) - d0
            if a < b:
                area += (a + 1 + b) * (b - a) // 2  # positions a..b-1 see a+1..b keys
        work.append(area)
    return work


def partition_chunks(cu: Sequence[int], cp: int, chunk: int) -> List[List[int]]:
    """Chunk ids per rank: heaviest chunk first, each to the least-loaded rank that has room
    (ceil(chunks / cp) per rank), so every rank gets the same number of chunks and about the same work."""
    if cu[-1] % chunk:
        raise ValueError(f"pack length {cu[-1]} is not a multiple of the chunk size {chunk}")
    work = chunk_work(cu, chunk)
    limit = -(-len(work) // cp)
    heap = [(0, r) for r in range(cp)]
    parts: List[List[int]] = [[] for _ in range(cp)]
    for cid in sorted(range(len(work)), key=lambda i: (-work[i], i)):
        while True:
            load, r = heapq.heappop(heap)
            if len(parts[r]) < limit:
                break
        parts[r].append(cid)
        heapq.heappush(heap, (load + work[cid], r))
    return [sorted(p) for p in parts]


@dataclass
class CPShare:
    """One rank's queries against gathered keys, in msa_kernels' context-parallel layout."""

    rank: int
    q_rows: torch.Tensor  # int64 [Tq] pack token of each query row
    k_rows: torch.Tensor  # int64 [Tk] pack token of each gathered key row
    cu_seqlens: torch.Tensor  # int32 [F + 1] query fragments
    key_starts: torch.Tensor  # int32 [F] first gathered key row of the fragment's document
    key_lens: torch.Tensor  # int32 [F] keys visible to the fragment's last query (= its document prefix)
    work: int  # causal query-key pairs


def cp_share(pack: Pack, cp: int = 16, chunk: int = 1024, rank: int = -1) -> CPShare:
    """The share of ``rank`` (-1: the rank with the most causal work, which bounds the step)."""
    cu = pack.cu_seqlens
    parts = partition_chunks(cu, cp, chunk)
    work = chunk_work(cu, chunk)
    loads = [sum(work[c] for c in p) for p in parts]
    if rank < 0:
        rank = max(range(cp), key=lambda r: (loads[r], -r))
    if not 0 <= rank < cp:
        raise ValueError(f"rank must be in [0, {cp}), got {rank}")
    frags = []  # (doc, local_begin, local_end) in query order, adjacent pieces merged
    for cid in parts[rank]:
        c0, c1 = cid * chunk, (cid + 1) * chunk
        for d, (d0, d1) in enumerate(zip(cu, cu[1:])):
            a, b = max(c0, d0) - d0, min(c1, d1) - d0
            if a >= b:
                continue
            if frags and frags[-1][0] == d and frags[-1][2] == a:
                frags[-1] = (d, frags[-1][1], b)
            else:
                frags.append((d, a, b))
    doc_keys = {}  # doc -> keys gathered (prefix length)
    for d, _, b in frags:
        doc_keys[d] = max(doc_keys.get(d, 0), b)
    k_base, k_rows, base = {}, [], 0
    for d in sorted(doc_keys):
        k_base[d] = base
        k_rows.append(torch.arange(cu[d], cu[d] + doc_keys[d]))
        base += doc_keys[d]
    q_rows = torch.cat([torch.arange(cu[d] + a, cu[d] + b) for d, a, b in frags])
    lens = [b - a for _, a, b in frags]
    cu_q = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)
    return CPShare(rank=rank, q_rows=q_rows, k_rows=torch.cat(k_rows),
                   cu_seqlens=cu_q, key_starts=torch.tensor([k_base[d] for d, _, _ in frags], dtype=torch.int32),
                   key_lens=torch.tensor([b for _, _, b in frags], dtype=torch.int32), work=loads[rank])
