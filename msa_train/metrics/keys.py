"""Metric key names shared by the trainer, the jsonl file, wandb and the plotting tools.

Keys are the public contract of a run's metrics (dashboards and tools/plot_run.py read them):
change a name here and every consumer follows.
"""

STEP = "step"  # global optimizer step; stored as the jsonl record's "step" and wandb's step
STAGE = "stage"  # "dense" (indexer warmup) | "sparse"; stored per jsonl record, not sent to wandb

LM_LOSS = "train/lm_loss"
INDEXER_KL = "train/indexer_kl"  # mean over MSA layers
GRAD_NORM = "train/grad_norm"
LR = "train/lr"
MOE_LB_LOSS = "moe/load_balancing_loss"
BLOCK_RECALL = "msa/block_recall"
SCORE_RECALL = "msa/score_recall"

TOKENS_PER_SEC_PER_GPU = "perf/tokens_per_sec_per_gpu"
TFLOPS_PER_GPU = "perf/tflops_per_gpu"
DENSE_EQUIV_TFLOPS_PER_GPU = "perf/dense_equiv_tflops_per_gpu"  # same tokens/s, full-attention FLOPs
MFU = "perf/mfu"
STEP_TIME_S = "perf/step_time_s"

MAX_ALLOCATED_GIB = "mem/max_allocated_gib"

CONSUMED_TOKENS = "progress/consumed_tokens"
PCT = "progress/pct"
ETA = "progress/eta"  # seconds to the end of the run (wandb charts numbers; console formats it)


def indexer_kl_layer(layer_idx: int) -> str:
    """Per-layer KL key; 0-based global layer index, zero-padded so dashboards sort numerically."""
    if layer_idx < 0:
        raise ValueError(f"layer_idx must be >= 0, got {layer_idx}")
    return f"indexer_kl/layer_{layer_idx:02d}"


# The keys every training log record carries (those that exist for the run's configuration;
# recall keys only on sampled steps, MoE loss only for MoE models, MFU only with a known peak).
CORE_TRAIN_KEYS = (
    LM_LOSS,
    INDEXER_KL,
    GRAD_NORM,
    LR,
    TOKENS_PER_SEC_PER_GPU,
    TFLOPS_PER_GPU,
    MAX_ALLOCATED_GIB,
    CONSUMED_TOKENS,
    PCT,
    ETA,
)
