"""Data layer: tokenizers, indexed datasets, the embedded stdlib corpus, resumable loaders.

Typical use (trainer):
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    vocab = padded_vocab_size(tokenizer.vocab_size, cfg.data.tokenizer.make_vocab_size_divisible_by, tp)
    train_ds, valid_ds, _ = build_datasets(cfg.data, tokenizer, seq_length, seed, n_train, n_valid)
    loader = build_data_loader(train_ds, consumed_samples, micro_batch_size, dp_rank, dp_size,
                               cfg.data.num_workers, collator_for(cfg.data, tokenizer))

Exports resolve lazily so that light users (prepare_data's worker processes, config validation)
do not pay for importing torch and Megatron.
"""

from importlib import import_module

_EXPORTS = {
    "DataConfig": "config", "DataConfigError": "errors", "StdlibCorpusConfig": "config",
    "TokenizerConfig": "config", "validate_data_config": "config",
    "build_datasets": "datasets", "build_gpt_dataset_config": "datasets",
    "BatchCollator": "loader", "build_data_loader": "loader", "collator_for": "loader",
    "cycle": "loader", "document_cu_seqlens": "loader",
    "ResumableBatchSampler": "sampler",
    "StdlibCorpus": "stdlib_corpus", "ensure_stdlib_corpus": "stdlib_corpus",
    "ByteTokenizer": "tokenizer", "HuggingFaceTokenizer": "tokenizer",
    "build_tokenizer": "tokenizer", "padded_vocab_size": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'msa_train.data' has no attribute {name!r}")
    value = getattr(import_module(f"msa_train.data.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
