"""Data layer: tokenizers, indexed datasets, the embedded stdlib corpus, resumable loaders.

Typical use (trainer):
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    vocab = padded_vocab_size(tokenizer.vocab_size, cfg.data.tokenizer.make_vocab_size_divisible_by, tp)
    train_ds, valid_ds, _ = build_datasets(cfg.data, tokenizer, seq_length, seed, n_train, n_valid)
    loader = build_data_loader(train_ds, consumed_samples, micro_batch_size, dp_rank, dp_size,
                               cfg.data.num_workers, collator_for(cfg.data, tokenizer))
"""

from msa_train.data.config import (DataConfig, DataConfigError, StdlibCorpusConfig,
                                   TokenizerConfig, validate_data_config)
from msa_train.data.datasets import build_datasets, build_gpt_dataset_config
from msa_train.data.loader import (BatchCollator, build_data_loader, collator_for, cycle,
                                   document_cu_seqlens)
from msa_train.data.sampler import ResumableBatchSampler
from msa_train.data.stdlib_corpus import StdlibCorpus, ensure_stdlib_corpus
from msa_train.data.tokenizer import (ByteTokenizer, HuggingFaceTokenizer, build_tokenizer,
                                      padded_vocab_size)

__all__ = [
    "BatchCollator", "ByteTokenizer", "DataConfig", "DataConfigError", "HuggingFaceTokenizer",
    "ResumableBatchSampler", "StdlibCorpus", "StdlibCorpusConfig", "TokenizerConfig",
    "build_data_loader", "build_datasets", "build_gpt_dataset_config", "build_tokenizer",
    "collator_for", "cycle", "document_cu_seqlens", "ensure_stdlib_corpus", "padded_vocab_size",
    "validate_data_config",
]
