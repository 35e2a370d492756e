"""Checks of Megatron indexed datasets before any index is built or any sample read.

Megatron's reader asserts on a bad header (a message without the failing field), reads a
truncated .idx through numpy (a traceback that names no file), maps a truncated .bin silently,
and its sample-index builder loops forever when a split holds no tokens. These checks read only
the .idx header and its sequence lengths (a memory map, no pass over the .bin) and raise a
DataConfigError naming the file and what to change.

.idx layout (version 1): b"MMIDIDX\\x00\\x00", <Q version, <B dtype code, <Q sequence count,
<Q document count, int32 lengths[S], int64 pointers[S], int64 document indices[D]
(+ int8 modes[S] for multimodal data).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from msa_train.data.errors import DataConfigError

_HEADER = b"MMIDIDX\x00\x00"
_FIXED = len(_HEADER) + 8 + 1 + 8 + 8  # header, version, dtype code, sequence / document counts
# Megatron's DType codes -> numpy dtypes (megatron.core.datasets.indexed_dataset.DType).
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
           7: np.float32, 8: np.uint16}
_TOKEN_DTYPES = (1, 3, 4, 5, 8)  # integer token ids; float/int8 data is not a token stream
SPLIT_NAMES = ("train", "valid", "test")


@dataclass
class IndexSummary:
    path: str
    dtype: type
    sequence_lengths: np.ndarray  # [S] tokens per sequence (one document = one sequence here)
    document_count: int

    @property
    def tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))


def _rebuild_hint(prefix: str) -> str:
    return (f"re-create it with `python tools/prepare_data.py --input ... --output-prefix {prefix}` "
            "(or copy it again: the copy is incomplete)")


def read_index(prefix: str, field_name: str) -> IndexSummary:
    """Header and sequence lengths of <prefix>.idx, checked against the file sizes."""
    idx, binf = prefix + ".idx", prefix + ".bin"
    size = os.path.getsize(idx)
    with open(idx, "rb") as fh:
        head = fh.read(_FIXED)
    if len(head) < _FIXED or head[: len(_HEADER)] != _HEADER:
        raise DataConfigError(
            f"{field_name}: {idx} is not a Megatron index file (header "
            f"{head[:len(_HEADER)]!r}, expected {_HEADER!r}, {size} bytes); {_rebuild_hint(prefix)}")
    version, code, seqs, docs = struct.unpack("<QBQQ", head[len(_HEADER):])
    if version != 1:
        raise DataConfigError(f"{field_name}: {idx} has index version {version}, only version 1 "
                              f"is readable; {_rebuild_hint(prefix)}")
    if code not in _TOKEN_DTYPES:
        what = np.dtype(_DTYPES[code]).name if code in _DTYPES else f"unknown code {code}"
        raise DataConfigError(
            f"{field_name}: {idx} declares token dtype {what}; token ids must be one of "
            f"{[np.dtype(_DTYPES[c]).name for c in _TOKEN_DTYPES]}; {_rebuild_hint(prefix)}")
    expected = _FIXED + seqs * (4 + 8) + docs * 8
    if size not in (expected, expected + seqs):  # + seqs: multimodal mode bytes
        raise DataConfigError(
            f"{field_name}: {idx} is {size} bytes but its header ({seqs} sequences, {docs} "
            f"document indices) needs {expected}: the file is truncated or damaged; "
            f"{_rebuild_hint(prefix)}")
    if seqs == 0:
        raise DataConfigError(f"{field_name}: {idx} holds no sequences; {_rebuild_hint(prefix)}")
    lengths = np.memmap(idx, dtype=np.int32, mode="r", offset=_FIXED, shape=(seqs,))
    if int(lengths.min()) < 0:
        raise DataConfigError(f"{field_name}: {idx} has negative sequence lengths (damaged); "
                              f"{_rebuild_hint(prefix)}")
    dtype = _DTYPES[code]
    summary = IndexSummary(idx, dtype, lengths, int(docs))
    want = summary.tokens * np.dtype(dtype).itemsize
    have = os.path.getsize(binf)
    if have != want:
        raise DataConfigError(
            f"{field_name}: {binf} is {have:,} bytes but {idx} describes {summary.tokens:,} "
            f"{np.dtype(dtype).name} tokens = {want:,} bytes: the .bin is "
            f"{'truncated' if have < want else 'longer than its index'} (or belongs to another "
            f".idx); {_rebuild_hint(prefix)}")
    return summary


def split_token_counts(lengths: np.ndarray, split: Sequence[float]) -> List[Optional[int]]:
    """Tokens of each split, with Megatron's rounding of document boundaries (None: no split)."""
    bounds = np.concatenate([[0.0], np.cumsum(split)])
    out: List[Optional[int]] = []
    n = len(lengths)
    for i, weight in enumerate(split):
        if weight <= 0:
            out.append(None)  # Megatron builds no dataset for a zero-weight split
            continue
        beg, end = int(round(bounds[i] * n)), int(round(bounds[i + 1] * n))
        out.append(int(lengths[beg:end].sum(dtype=np.int64)))
    return out


def check_split_sizes(prefixes: Sequence[str], split: Optional[Sequence[float]],
                      sizes: Sequence[int], seq_length: int, field_name: str,
                      split_text: Optional[str] = None) -> None:
    """Every split Megatron will build must hold at least one sample (seq_length + 1 tokens).

    With fewer tokens Megatron's sample-index builder keeps adding epochs of an empty split and
    never returns. `split=None` (a per-split blend): each prefix is the whole of its split.
    """
    need = seq_length + 1
    for i, prefix in enumerate(prefixes):
        summary = read_index(prefix, f"{field_name}[{i}]")
        if split is None:
            counts: List[Optional[int]] = [summary.tokens]
            names = [field_name]
        else:
            counts = split_token_counts(summary.sequence_lengths, split)
            names = list(SPLIT_NAMES)
        for name, tokens, wanted in zip(names, counts, sizes):
            if tokens is None or tokens >= need:
                continue
            where = (f"data.split={split_text!r} gives the split {name!r} {tokens:,} tokens"
                     if split is not None else f"it has {tokens:,} tokens")
            raise DataConfigError(
                f"{field_name}[{i}]={prefix!r}: the dataset has {summary.tokens:,} tokens in "
                f"{len(summary.sequence_lengths):,} documents; {where}; the split {name!r} needs "
                f"at least {need:,} (one sample of train.seq_length + 1 tokens, {wanted:,} "
                f"samples requested): change data.split or add data")


def check_prefix_files(prefixes: Sequence[str], field_name: str) -> Dict[str, IndexSummary]:
    return {p: read_index(p, f"{field_name}[{i}]") for i, p in enumerate(prefixes)}
