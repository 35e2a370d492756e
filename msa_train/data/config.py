"""Hydra structured-config schema for the data layer (config group `data/`).

Only primitive, list and Optional fields so that OmegaConf can type-check overrides at compose
time. Cross-field rules (a source needs its paths, weights match paths, ...) are checked by
`validate_data_config`, which the trainer calls before any compute and which `build_datasets`
calls again so that library users get the same messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional

from msa_train.data.errors import DataConfigError
from msa_train.data.index_check import read_index
from msa_train.data.indexed import check_prefix_exists, check_tokenizer_matches

SOURCES = ("stdlib", "indexed", "mock")
TOKENIZER_TYPES = ("byte", "huggingface")


@dataclass
class TokenizerConfig:
    # "byte": bytes 0-255 + EOD (no files, no network). "huggingface": AutoTokenizer(name_or_path).
    type: str = "byte"
    name_or_path: Optional[str] = None
    # The embedding / output layer is sized to a multiple of this (times TP) so that every TP shard
    # holds whole, aligned rows; ids >= vocab_size are never produced by the tokenizer.
    make_vocab_size_divisible_by: int = 128


@dataclass
class StdlibCorpusConfig:
    # Root of the cached corpus; None -> ${MSA_TRAIN_CACHE:-~/.cache/msa_train}.
    cache_dir: Optional[str] = None
    # Include test/ directories of the standard library (doubles the corpus, mostly test code).
    include_tests: bool = False
    # Use only the first N files (sorted order). For fast tests; the default corpus uses them all.
    max_files: Optional[int] = None


@dataclass
class DataConfig:
    # Where documents come from: "stdlib" (embedded default, built on first use from the running
    # interpreter's standard library), "indexed" (Megatron .bin/.idx prefixes in `paths`),
    # "mock" (Megatron's synthetic MockGPTDataset, for throughput tests only).
    source: str = "stdlib"
    # Indexed-dataset prefixes (path without .bin/.idx) and optional blend weights (same length;
    # None -> weighted by dataset size).
    paths: List[str] = field(default_factory=list)
    weights: Optional[List[float]] = None
    # Optional separate validation blend. When set, training uses ALL documents of `paths`,
    # validation uses `valid_paths`, and data.split is ignored (Megatron's blend_per_split).
    valid_paths: List[str] = field(default_factory=list)
    valid_weights: Optional[List[float]] = None
    # Train/valid/test proportions of the documents of each prefix, Megatron style.
    split: str = "98,2,0"
    # Megatron's GPTDataset index cache; None -> "<prefix>/cache" next to the data
    # (for the stdlib corpus: inside its cache directory).
    index_cache_dir: Optional[str] = None
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    stdlib: StdlibCorpusConfig = field(default_factory=StdlibCorpusConfig)
    # Sequences are fixed-length windows over the concatenated documents and may span EOD.
    # These switches make positions / attention / loss respect document boundaries.
    reset_position_ids: bool = False
    # Attention stays causal over the whole window unless this is on; then batches carry
    # `cu_seqlens` (packed document boundaries) for the attention to honour.
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    # DataLoader worker processes (0 = load in the training process; datasets are memory-mapped).
    num_workers: int = 0
    # Read .bin files through mmap (default) or plain file reads (some network filesystems).
    mmap_bin_files: bool = True


def _check_weights(paths: List[str], weights: Optional[List[float]], paths_field: str,
                   weights_field: str) -> None:
    if weights is None:
        return
    if len(weights) != len(paths):
        raise DataConfigError(
            f"{weights_field} has {len(weights)} entries but {paths_field} has {len(paths)}: "
            f"give one weight per prefix, or set {weights_field}=null to weight by size")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise DataConfigError(
            f"{weights_field}={list(weights)} must be non-negative with a positive sum")


def parse_split(split: str) -> List[float]:
    """'98,2,0' -> [0.98, 0.02, 0.0]; raises DataConfigError naming data.split."""
    parts = [p.strip() for p in re.split(r"[,/]", str(split)) if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not values or len(values) > 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise DataConfigError(
            f"data.split={split!r} must be up to three non-negative numbers with a positive sum, "
            f"e.g. '98,2,0' (train,valid,test)")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return [v / total for v in values]


def validate_data_config(cfg: DataConfig, check_files: bool = True) -> None:
    """Fail early, before any compute, with a message naming the field to change.

    check_files=False skips the on-disk checks of the prefixes (a dry run plans a cluster job from a
    machine that does not see its data).
    """
    if cfg.source not in SOURCES:
        raise DataConfigError(f"data.source={cfg.source!r} is not one of {list(SOURCES)}")
    parse_split(cfg.split)
    if cfg.source == "indexed":
        if not cfg.paths:
            raise DataConfigError(
                "data.paths is empty: data.source=indexed needs Megatron indexed-dataset prefixes "
                "(path without .bin/.idx), e.g. data.paths=[/data/corpus_text_document]; "
                "make them with tools/prepare_data.py")
        _check_weights(list(cfg.paths), cfg.weights, "data.paths", "data.weights")
    elif cfg.paths:
        raise DataConfigError(
            f"data.paths is set but data.source={cfg.source!r} ignores it: "
            f"set data.source=indexed (or use the data=indexed config)")
    if cfg.valid_paths:
        if cfg.source == "mock":
            raise DataConfigError(
                "data.valid_paths is set but data.source=mock ignores it: clear data.valid_paths")
        _check_weights(list(cfg.valid_paths), cfg.valid_weights, "data.valid_paths",
                       "data.valid_weights")
    prefixes = [("paths", cfg.paths)] if cfg.source == "indexed" else []
    for name, group in (prefixes + [("valid_paths", cfg.valid_paths)]) if check_files else []:
        for i, prefix in enumerate(group):
            check_prefix_exists(prefix, f"data.{name}[{i}]")
            read_index(prefix, f"data.{name}[{i}]")  # header, dtype, .bin size vs .idx
            check_tokenizer_matches(prefix, f"data.{name}[{i}]", cfg.tokenizer.type)
    tok = cfg.tokenizer
    if cfg.source == "stdlib" and tok.type != "byte":
        raise DataConfigError(
            f"data.source=stdlib is tokenized byte-level, but data.tokenizer.type={tok.type!r}: "
            f"use data.tokenizer.type=byte, or prepare the corpus with your tokenizer "
            f"(tools/prepare_data.py) and train with data.source=indexed")
    if tok.type not in TOKENIZER_TYPES:
        raise DataConfigError(
            f"data.tokenizer.type={tok.type!r} is not one of {list(TOKENIZER_TYPES)}")
    if tok.type == "huggingface" and not tok.name_or_path:
        raise DataConfigError(
            "data.tokenizer.name_or_path is required with data.tokenizer.type=huggingface "
            "(a hub name available offline or a local tokenizer directory)")
    if tok.make_vocab_size_divisible_by < 1:
        raise DataConfigError(
            f"data.tokenizer.make_vocab_size_divisible_by={tok.make_vocab_size_divisible_by} "
            f"must be >= 1")
    if cfg.stdlib.max_files is not None and cfg.stdlib.max_files < 1:
        raise DataConfigError(f"data.stdlib.max_files={cfg.stdlib.max_files} must be >= 1 or null")
    if cfg.num_workers < 0:
        raise DataConfigError(f"data.num_workers={cfg.num_workers} must be >= 0")
