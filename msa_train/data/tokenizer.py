"""Tokenizers: a dependency-free byte-level one (the default) and a lazy Hugging Face wrapper.

Both expose the interface Megatron's datasets and our tools use: .vocab_size, .eod, .pad,
.tokenize(str) -> list[int], .detokenize(ids) -> str, and .unique_identifiers (an OrderedDict that
Megatron hashes into its dataset-index cache key, so a different tokenizer never reuses indices).

Byte-level ids: 0..255 are the UTF-8 bytes of the text, 256 is EOD (end of document, appended by
tools/prepare_data.py and the stdlib corpus). vocab_size is 257; models should use
`padded_vocab_size(257, 128, tp) = 384` rows, so ids 257..383 are never produced.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterable, List, Sequence

import numpy as np

from msa_train.data.config import DataConfigError, TokenizerConfig

BYTE_VOCAB = 256


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus EOD = 256. Lossless for any text, needs no files."""

    def __init__(self) -> None:
        self.unique_identifiers = OrderedDict(cls=type(self).__name__, eod=self.eod)

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB + 1

    @property
    def eod(self) -> int:
        return BYTE_VOCAB

    # Megatron masks `pad` ids out of the loss; -1 can never occur in the data, so nothing real is
    # masked (the byte vocabulary has no pad token of its own).
    pad = -1

    def tokenize(self, text: str) -> List[int]:
        # surrogateescape round-trips files that are not valid UTF-8 byte-for-byte.
        return list(text.encode("utf-8", errors="surrogateescape"))

    def tokenize_bytes(self, data: bytes) -> np.ndarray:
        """Fast path for raw file contents: uint16 ids without a Python-level list."""  # [n]
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def detokenize(self, ids: Iterable[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < BYTE_VOCAB)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eod=256)"


class HuggingFaceTokenizer:
    """Wraps transformers.AutoTokenizer (or a bare tokenizers.Tokenizer for a tokenizer.json file).

    EOD is the tokenizer's eos token; documents get it appended, never inserted by the tokenizer
    itself (add_special_tokens=False), so a document is exactly its text plus one EOD.
    """

    def __init__(self, name_or_path: str) -> None:
        self.name_or_path = name_or_path
        self._hf = None
        self._raw = None
        if name_or_path.endswith(".json"):
            try:
                import tokenizers
            except ImportError as err:
                raise DataConfigError(
                    f"data.tokenizer.name_or_path={name_or_path!r} is a tokenizer.json file but the "
                    f"`tokenizers` package is not installed: pip install tokenizers") from err
            self._raw = tokenizers.Tokenizer.from_file(name_or_path)
            vocab_size = self._raw.get_vocab_size(with_added_tokens=True)
            eod = None
            for name in ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>"):
                eod = self._raw.token_to_id(name)
                if eod is not None:
                    break
        else:
            try:
                from transformers import AutoTokenizer
            except ImportError as err:
                raise DataConfigError(
                    "data.tokenizer.type=huggingface needs the `transformers` package "
                    "(pip install transformers), or set data.tokenizer.type=byte") from err
            try:
                self._hf = AutoTokenizer.from_pretrained(name_or_path)
            except OSError as err:
                raise DataConfigError(
                    f"data.tokenizer.name_or_path={name_or_path!r} could not be loaded (no such "
                    f"local directory and not in the offline Hugging Face cache): {err}") from err
            vocab_size = len(self._hf)
            eod = self._hf.eos_token_id
        if eod is None:
            raise DataConfigError(
                f"tokenizer {name_or_path!r} has no end-of-text/eos token to use as EOD; "
                f"pick a tokenizer that defines eos_token")
        self._vocab_size = int(vocab_size)
        self._eod = int(eod)
        pad = getattr(self._hf, "pad_token_id", None) if self._hf is not None else None
        self.pad = -1 if pad is None else int(pad)
        self.unique_identifiers = OrderedDict(
            cls=type(self).__name__, name_or_path=name_or_path, vocab_size=self._vocab_size,
            eod=self._eod)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> List[int]:
        if self._raw is not None:
            return self._raw.encode(text, add_special_tokens=False).ids
        return self._hf(text, add_special_tokens=False)["input_ids"]

    def detokenize(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self._raw is not None:
            return self._raw.decode(ids)
        return self._hf.decode(ids)

    def __repr__(self) -> str:
        return (f"HuggingFaceTokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"eod={self.eod})")


def tokenizer_identity(tokenizer) -> dict:
    """What a prepared dataset records about its tokenizer (checked again at training time)."""
    if isinstance(tokenizer, ByteTokenizer):
        return {"type": "byte", "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod}
    return {"type": "huggingface", "name_or_path": getattr(tokenizer, "name_or_path", None),
            "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod}


def build_tokenizer(cfg: TokenizerConfig):
    """TokenizerConfig (data.tokenizer) -> ByteTokenizer | HuggingFaceTokenizer."""
    if cfg.type == "byte":
        if cfg.name_or_path:
            raise DataConfigError(
                f"data.tokenizer.name_or_path={cfg.name_or_path!r} is set but "
                f"data.tokenizer.type=byte: set data.tokenizer.type=huggingface to use it")
        return ByteTokenizer()
    if cfg.type == "huggingface":
        if not cfg.name_or_path:
            raise DataConfigError(
                "data.tokenizer.name_or_path is required with data.tokenizer.type=huggingface")
        return HuggingFaceTokenizer(cfg.name_or_path)
    raise DataConfigError(f"data.tokenizer.type={cfg.type!r} must be 'byte' or 'huggingface'")


def padded_vocab_size(vocab_size: int, divisible_by: int = 128, tensor_parallel_size: int = 1) -> int:
    """Smallest multiple of divisible_by * TP that holds vocab_size (Megatron's rule)."""
    if vocab_size < 1 or divisible_by < 1 or tensor_parallel_size < 1:
        raise ValueError(
            f"padded_vocab_size needs positive sizes, got vocab_size={vocab_size}, "
            f"divisible_by={divisible_by}, tensor_parallel_size={tensor_parallel_size}")
    multiple = divisible_by * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)
