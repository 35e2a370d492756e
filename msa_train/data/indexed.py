"""Writing and checking Megatron indexed datasets (<prefix>.bin + <prefix>.idx).

One document = one sequence in the index (Megatron's GPTDataset splits by sequence), token ids of
the text followed by one EOD. Files are written under temporary names and renamed into place, the
.idx last, so a reader never sees a half-written dataset under the final prefix.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Union

import numpy as np

from msa_train.data.errors import DataConfigError


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def meta_path(prefix: str) -> str:
    """Sidecar JSON written by msa-train: tokenizer identity and counts of the dataset."""
    return prefix + ".meta.json"


def read_meta(prefix: str) -> Optional[dict]:
    """The sidecar of `prefix`, or None for datasets made by other tools."""
    try:
        with open(meta_path(prefix)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def prefix_exists(prefix: str) -> bool:
    return os.path.isfile(bin_path(prefix)) and os.path.isfile(idx_path(prefix))


def check_prefix_exists(prefix: str, field_name: str) -> None:
    """Raise DataConfigError naming `field_name` when <prefix>.bin/.idx are missing."""
    if prefix_exists(prefix):
        return
    hint = ""
    if prefix.endswith((".bin", ".idx")):
        hint = f" (give the prefix without the extension: {prefix[:-4]!r})"
    missing = [p for p in (bin_path(prefix), idx_path(prefix)) if not os.path.isfile(p)]
    raise DataConfigError(
        f"{field_name}={prefix!r}: indexed dataset not found, missing {missing}{hint}; "
        f"create it with `python tools/prepare_data.py --input ... --output-prefix {prefix}`")


@dataclass
class WriteSummary:
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    skipped_empty: int = 0
    output_bytes: int = 0

    def line(self) -> str:
        return (f"{self.documents:,} documents, {self.tokens:,} tokens (EOD included), "
                f"{self.input_bytes / 1e6:,.2f} MB of text in, {self.output_bytes / 1e6:,.2f} MB "
                f"written, {self.skipped_empty:,} empty documents skipped")


class IndexedWriter:
    """Streams documents into <prefix>.bin/.idx via Megatron's IndexedDatasetBuilder.

    Usage: with IndexedWriter(prefix, vocab_size, eod) as w: w.add(ids, n_input_bytes)
    On an exception the temporary files are removed and nothing appears under `prefix`.
    """

    def __init__(self, prefix: str, vocab_size: int, eod: int,
                 tokenizer_info: Optional[dict] = None) -> None:
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

        if not 0 <= eod < vocab_size:
            raise ValueError(f"eod={eod} must lie in [0, vocab_size={vocab_size})")
        self.prefix = prefix
        self.eod = eod
        self.vocab_size = vocab_size
        self.tokenizer_info = tokenizer_info or {"vocab_size": vocab_size, "eod": eod}
        self.dtype = DType.optimal_dtype(vocab_size)
        parent = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(parent, exist_ok=True)
        self._tmp = f"{prefix}.tmp-{os.getpid()}"
        self._builder = IndexedDatasetBuilder(bin_path(self._tmp), dtype=self.dtype)
        self.summary = WriteSummary()
        self._done = False

    def add(self, ids: Union[Sequence[int], np.ndarray], input_bytes: int = 0) -> None:
        """Append one document; `ids` must not contain the EOD (it is appended here)."""
        self.summary.input_bytes += input_bytes
        n = len(ids)
        if n == 0:
            self.summary.skipped_empty += 1
            return
        ids = np.asarray(ids)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            # would wrap silently in the narrow on-disk dtype
            raise ValueError(
                f"token id {lo if lo < 0 else hi} outside [0, vocab_size={self.vocab_size}) in "
                f"document {self.summary.documents}: the tokenizer's vocab_size is wrong")
        doc = np.empty(n + 1, dtype=self.dtype)  # [n + 1]
        doc[:n] = ids
        doc[n] = self.eod
        self._builder.add_document(doc, [n + 1])
        self.summary.documents += 1
        self.summary.tokens += n + 1

    def __enter__(self) -> "IndexedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()

    def abort(self) -> None:
        """Drop the temporary files; nothing is left under the prefix."""
        self._done = True
        self._builder.data_file.close()
        for path in (bin_path(self._tmp), idx_path(self._tmp), meta_path(self._tmp)):
            if os.path.exists(path):
                os.remove(path)

    def finalize(self) -> WriteSummary:
        if self._done:
            raise RuntimeError(f"IndexedWriter({self.prefix!r}) was already finalized or aborted")
        if self.summary.documents == 0:
            self.abort()
            raise DataConfigError(
                f"no non-empty documents to write to {self.prefix!r} "
                f"({self.summary.skipped_empty} empty ones skipped): check the input paths, "
                f"file pattern or json key")
        self._done = True
        self._builder.finalize(idx_path(self._tmp))
        meta = {"tokenizer": self.tokenizer_info, **asdict(self.summary)}
        meta.pop("output_bytes")
        with open(meta_path(self._tmp), "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(bin_path(self._tmp), bin_path(self.prefix))
        os.replace(meta_path(self._tmp), meta_path(self.prefix))
        os.replace(idx_path(self._tmp), idx_path(self.prefix))  # last: publishes the dataset
        self.summary.output_bytes = (os.path.getsize(bin_path(self.prefix))
                                     + os.path.getsize(idx_path(self.prefix)))
        return self.summary


def check_tokenizer_matches(prefix: str, field_name: str, tokenizer_type: str,
                            tokenizer=None) -> None:
    """Refuse data prepared with another tokenizer: its ids would silently mean other text."""
    meta = read_meta(prefix)
    if not meta or "tokenizer" not in meta:
        return
    recorded = meta["tokenizer"]
    if recorded.get("type", tokenizer_type) != tokenizer_type:
        raise DataConfigError(
            f"{field_name}={prefix!r} was prepared with the {recorded.get('type')} tokenizer "
            f"({recorded}) but data.tokenizer.type={tokenizer_type!r}: set data.tokenizer to the "
            f"tokenizer the data was prepared with")
    if tokenizer is not None:
        for key in ("vocab_size", "eod"):
            if key in recorded and recorded[key] != getattr(tokenizer, key):
                raise DataConfigError(
                    f"{field_name}={prefix!r} was prepared with a tokenizer of {key}="
                    f"{recorded[key]} but data.tokenizer gives {key}={getattr(tokenizer, key)} "
                    f"({tokenizer!r}): set data.tokenizer to the one the data was prepared with")
