"""Run metrics: console line, jsonl file, lazy wandb, FLOPs/MFU, progress/ETA, plots.

Trainer wiring (all objects are cheap; wandb and matplotlib are imported only when used):

    from msa_train import metrics as M

    logger = M.MetricsLogger(cfg.logging, run_dir, run_id=ckpt_meta.get("wandb_run_id"),
                             is_logging_rank=is_last_pp_stage and first rank of its DP/TP/CP group,
                             group=run_name, job_type=stage, total_steps=train_steps,
                             wandb_config=resolved_cfg)
    meter = M.ThroughputMeter(world_size, M.FlopsPerToken.for_model(model_cfg, attn_cfg, seq_len, stage),
                              M.resolve_peak_tflops(cfg.logging.peak_tflops))
    progress = M.RunProgress(total_tokens, start_tokens=consumed_tokens_at_resume)
    ...
    if logger.should_log(step):
        m = {M.keys.LM_LOSS: loss, M.keys.INDEXER_KL: kl_mean, M.keys.GRAD_NORM: gn, M.keys.LR: lr}
        m.update(meter.rates(tokens_since_last_log, seconds_since_last_log))
        m.update(progress.update(consumed_tokens))
        m[M.keys.MAX_ALLOCATED_GIB] = M.max_allocated_gib()
        logger.log(step, m)                # jsonl + wandb + console line
    ...
    logger.close(); M.plot_run(run_dir)    # training_curves.png beside metrics.jsonl

Key names: msa_train.metrics.keys. Schema of configs/logging: msa_train.metrics.config.LoggingConfig.
"""
from msa_train.metrics import keys
from msa_train.metrics.config import LoggingConfig, validate_logging_config
from msa_train.metrics.console import console_line
from msa_train.metrics.throughput import FlopsPerToken, ThroughputMeter, max_allocated_gib
from msa_train.metrics.jsonl import METRICS_FILENAME, JsonlWriter, read_metrics
from msa_train.metrics.logger import MetricsLogger
from msa_train.metrics.peaks import lookup_peak_tflops, resolve_peak_tflops
from msa_train.metrics.plots import plot_run
from msa_train.metrics.progress import RunProgress, format_count, format_duration

__all__ = [
    "keys", "LoggingConfig", "validate_logging_config", "console_line", "FlopsPerToken",
    "ThroughputMeter", "max_allocated_gib", "METRICS_FILENAME", "JsonlWriter", "read_metrics",
    "MetricsLogger", "lookup_peak_tflops", "resolve_peak_tflops", "plot_run", "RunProgress",
    "format_count", "format_duration",
]
