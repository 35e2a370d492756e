"""Evaluation of trained checkpoints (`msa-eval`): perplexity by position in sparse and dense mode,
synthetic long-context retrieval, indexer recall and KL per MSA layer, selection patterns, and
user task files. See msa_train.eval.cli for the command line."""
