"""Train/valid/test datasets through Megatron's BlendedMegatronDatasetBuilder + GPTDataset.

What a sample is (GPTDataset semantics): documents (each ending in EOD) are shuffled per epoch and
concatenated; sample i is a fixed window of seq_length + 1 tokens of that stream, so a window can
span several documents and cut them anywhere. tokens = window[:-1], labels = window[1:]. By default
nothing resets at EOD: positions run 0..seq_length-1 over the whole window, attention is causal
over the whole window and every label counts. data.reset_position_ids / reset_attention_mask /
eod_mask_loss switch to per-document positions / attention / no loss on EOD targets.

All indices (document order, window starts, shuffle) depend only on (data, seq_length, seed, split,
sample counts) and are cached as .npy next to the data (data.index_cache_dir overrides), so every
rank and every restart sees the same sample at the same index.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, List, Optional, Tuple

import torch

from msa_train.data.config import (DataConfig, DataConfigError, parse_split,
                                   validate_data_config)
from msa_train.data.indexed import check_tokenizer_matches

logger = logging.getLogger(__name__)

# Weighted blends build each member with this spare fraction of samples. Megatron's default (0.5%)
# is less than one sample for short runs and tests, where rounding then oversamples a member.
_WEIGHTED_SURPLUS = 0.05


def _ensure_dataset_helpers() -> None:
    """Megatron's C++ index helpers ship prebuilt in the wheel; compile them only if missing."""
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
        return
    except ImportError:
        pass
    import subprocess

    import megatron.core.datasets as mcd

    src = os.path.dirname(mcd.__file__)
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if rank0:
        proc = subprocess.run(["make", "-C", src], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"Megatron's dataset helpers (helpers_cpp) are missing and `make -C {src}` failed; "
                f"install a megatron-core wheel that ships them or a C++ compiler + pybind11:\n"
                f"{proc.stderr[-2000:]}")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    from megatron.core.datasets import helpers_cpp  # noqa: F401,F811


@contextlib.contextmanager
def _single_process_rank():
    """Megatron's BlendedDataset calls torch.distributed.get_rank() even when no process group
    exists; outside torch.distributed we are the only rank, so answer 0 for the duration."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    original = torch.distributed.get_rank
    torch.distributed.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        torch.distributed.get_rank = original


@contextlib.contextmanager
def _bounded_epochs():
    """Megatron's GPTDataset adds epochs until a split holds enough tokens: with an empty split
    that loop never ends (100% CPU, no output). check_split_sizes refuses such data first; this
    bound is the backstop for anything it cannot see (a blend member's rounding, mock data)."""
    from megatron.core.datasets.gpt_dataset import GPTDataset

    original = GPTDataset._get_num_epochs

    def bounded(self, num_tokens_per_epoch: int) -> int:
        if self.num_samples is not None and num_tokens_per_epoch <= 0:
            raise DataConfigError(
                f"the split {self.index_split.name!r} of {self.dataset_path!r} holds no tokens but "
                f"needs {self.num_samples:,} samples (and at least one token) of {self.config.sequence_length + 1} tokens: "
                "change data.split or add data")
        return original(self, num_tokens_per_epoch)

    GPTDataset._get_num_epochs = bounded
    try:
        yield
    finally:
        GPTDataset._get_num_epochs = original


@contextlib.contextmanager
def _quiet_megatron_logs():
    """Megatron logs every index build at INFO; keep our own one-line summary instead."""
    loggers = [logging.getLogger(n) for n in (
        "megatron.core.datasets.blended_megatron_dataset_builder",
        "megatron.core.datasets.blended_megatron_dataset_config",
        "megatron.core.datasets.gpt_dataset", "megatron.core.datasets.blended_dataset",
        "megatron.core.datasets.indexed_dataset", "megatron.core.datasets.megatron_dataset")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def resolve_blend(cfg: DataConfig) -> Tuple[Optional[List[str]], Optional[List[float]], Optional[str]]:
    """(prefixes, weights, index cache dir) for the configured source; builds the stdlib corpus."""
    if cfg.source == "mock":
        return None, None, cfg.index_cache_dir
    if cfg.source == "stdlib":
        from msa_train.data.stdlib_corpus import ensure_stdlib_corpus

        corpus = ensure_stdlib_corpus(cfg.stdlib)
        logger.info(corpus.line())
        cache = cfg.index_cache_dir or os.path.join(corpus.directory, "index_cache")
        return [corpus.prefix], None, cache
    return list(cfg.paths), (list(cfg.weights) if cfg.weights is not None else None), \
        cfg.index_cache_dir


def _check_split_sizes(cfg: DataConfig, prefixes: Optional[List[str]], seq_length: int,
                       sample_counts: List[int]) -> None:
    """Refuse data too small for a split before Megatron's index builder can loop on it."""
    from msa_train.data.index_check import check_split_sizes

    if not prefixes:
        return
    if cfg.valid_paths:
        check_split_sizes(prefixes, None, sample_counts[:1], seq_length, "data.paths")
        check_split_sizes(list(cfg.valid_paths), None, sample_counts[1:2], seq_length,
                          "data.valid_paths")
        return
    field = "data.paths" if cfg.source == "indexed" else "data.source=stdlib corpus"
    check_split_sizes(prefixes, parse_split(cfg.split), sample_counts, seq_length, field,
                      split_text=str(cfg.split))


def build_gpt_dataset_config(cfg: DataConfig, tokenizer, seq_length: int, seed: int,
                             sample_counts: Optional[List[int]] = None):
    """DataConfig -> megatron GPTDatasetConfig (also resolves/builds the data it points at).

    sample_counts ([train, valid, test] samples): also check that every split can hold them."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    validate_data_config(cfg)
    if seq_length < 1:
        raise DataConfigError(f"sequence length {seq_length} must be >= 1")
    prefixes, weights, cache = resolve_blend(cfg)
    for name, group in (("paths", prefixes or []), ("valid_paths", list(cfg.valid_paths))):
        for i, prefix in enumerate(group):
            check_tokenizer_matches(prefix, f"data.{name}[{i}]", cfg.tokenizer.type, tokenizer)
    blend = None if prefixes is None else (prefixes, weights)
    blend_per_split = None
    if sample_counts is not None:
        _check_split_sizes(cfg, prefixes, seq_length, sample_counts)
    split = str(cfg.split)
    if cfg.valid_paths:
        vw = list(cfg.valid_weights) if cfg.valid_weights is not None else None
        blend_per_split = [blend, (list(cfg.valid_paths), vw), None]
        blend, split = None, None
    weighted = weights is not None or (cfg.valid_paths and cfg.valid_weights is not None)
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=cache,
        mmap_bin_files=cfg.mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=cfg.reset_position_ids,
        reset_attention_mask=cfg.reset_attention_mask,
        eod_mask_loss=cfg.eod_mask_loss,
        # Causal masking is the attention's job; an explicit [s, s] mask per sample would only
        # cost memory (document boundaries, when wanted, travel as cu_seqlens instead).
        create_attention_mask=False,
        mid_level_dataset_surplus=_WEIGHTED_SURPLUS if weighted else 0.005,
    )


def build_datasets(data_cfg: DataConfig, tokenizer, seq_length: int, seed: int,
                   num_train_samples: int, num_valid_samples: int, num_test_samples: int = 0,
                   is_built_on_rank: Optional[Callable[[], bool]] = None):
    """-> (train, valid, test) datasets (None for a split with zero weight).

    Call on every rank (it synchronizes: rank 0 writes the index cache, the others then read it).
    `is_built_on_rank` defaults to every rank: each data-parallel/tensor-parallel rank reads its
    own memory-mapped copy, so no broadcast of batches over TP is needed.
    Each sample: {"tokens", "labels", "loss_mask", "position_ids"}, all [seq_length].
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    for name, value in (("num_train_samples", num_train_samples),
                        ("num_valid_samples", num_valid_samples),
                        ("num_test_samples", num_test_samples)):
        if value is None or value < 0:
            raise DataConfigError(f"{name}={value} must be a non-negative sample count")
    _ensure_dataset_helpers()
    with _quiet_megatron_logs():
        sizes = [num_train_samples, num_valid_samples, num_test_samples]
        gpt_cfg = build_gpt_dataset_config(data_cfg, tokenizer, seq_length, seed, sizes)
        cls = MockGPTDataset if gpt_cfg.mock else GPTDataset
        try:
            with _single_process_rank(), _bounded_epochs():
                train, valid, test = BlendedMegatronDatasetBuilder(
                    cls, sizes, is_built_on_rank or (lambda: True), gpt_cfg).build()
        except Exception as err:
            # Megatron raises the OSError itself (one process) or wraps it (torch.distributed).
            os_err = err if isinstance(err, OSError) else err.__cause__
            if not isinstance(os_err, OSError):
                raise
            where = gpt_cfg.path_to_cache or "<prefix>/cache next to each data prefix"
            raise DataConfigError(
                f"building the dataset indices failed reading/writing Megatron's index cache at "
                f"{where} ({os_err}); set data.index_cache_dir to a writable directory that all "
                f"ranks share (on several nodes: a shared filesystem, since global rank 0 writes "
                f"it and every other rank reads it)") from err
    logger.info("datasets (seq_length=%d): train=%s valid=%s test=%s samples", seq_length,
                *(None if d is None else len(d) for d in (train, valid, test)))
    return train, valid, test
