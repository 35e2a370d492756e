"""Metrics: key contract of the jsonl file, console line, rates, progress/ETA, MFU peaks."""
import io
import json

import pytest

from msa_train.metrics import (FlopsPerToken, LoggingConfig, MetricsLogger, RunProgress,
                               ThroughputMeter, console_line, keys, lookup_peak_tflops,
                               read_metrics, resolve_peak_tflops)
from msa_train.metrics.progress import format_duration

ISSUE_KEYS = [
    "train/lm_loss", "train/indexer_kl", "indexer_kl/layer_03", "msa/block_recall",
    "msa/score_recall", "train/grad_norm", "train/lr", "moe/load_balancing_loss",
    "perf/tokens_per_sec_per_gpu", "perf/tflops_per_gpu", "perf/mfu", "mem/max_allocated_gib",
    "progress/consumed_tokens", "progress/pct", "progress/eta",
]


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _full_step_metrics(step, clock, progress, meter):
    m = {keys.LM_LOSS: 3.0 - 0.01 * step, keys.INDEXER_KL: 0.5 / step, keys.indexer_kl_layer(3): 0.4,
         keys.BLOCK_RECALL: 0.72, keys.SCORE_RECALL: 0.91, keys.GRAD_NORM: 1.5, keys.LR: 3e-4,
         keys.MOE_LB_LOSS: 0.01, keys.MAX_ALLOCATED_GIB: 61.5}
    clock.t += 2.0
    m.update(meter.rates(tokens=8 * 4096, seconds=2.0))
    m.update(progress.update(step * 8 * 4096))
    return m


def test_jsonl_has_issue_keys(tmp_path):
    clock = FakeClock()
    progress = RunProgress(total_tokens=100 * 8 * 4096, clock=clock)
    meter = ThroughputMeter(num_gpus=8, flops=FlopsPerToken(actual=6e9, dense_equiv=9e9),
                            peak_tflops=989.4)
    out = io.StringIO()
    cfg = LoggingConfig(wandb=False)
    with MetricsLogger(cfg, str(tmp_path), group="g", job_type="sparse", total_steps=100,
                       stream=out) as logger:
        for step in (1, 2, 3):
            logger.log(step, _full_step_metrics(step, clock, progress, meter))
    recs = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in recs] == [1, 2, 3]
    for key in ISSUE_KEYS:
        assert key in recs[-1], key
    assert recs[-1]["stage"] == "sparse"
    assert recs[-1][keys.TOKENS_PER_SEC_PER_GPU] == pytest.approx(8 * 4096 / 2.0 / 8)
    assert recs[-1][keys.MFU] == pytest.approx(2048 * 6e9 / 1e12 / 989.4)
    assert recs[-1][keys.DENSE_EQUIV_TFLOPS_PER_GPU] == pytest.approx(2048 * 9e9 / 1e12)
    assert recs[-1][keys.PCT] == pytest.approx(3.0)
    # 97 steps left at 2 s each
    assert recs[-1][keys.ETA] == pytest.approx(97 * 2.0)
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("[sparse] step 3/100 3.00%")


def test_non_logging_rank_writes_nothing(tmp_path):
    logger = MetricsLogger(LoggingConfig(wandb=True), str(tmp_path / "r"), is_logging_rank=False)
    logger.log(1, {keys.LM_LOSS: 1.0})
    logger.close()
    assert not (tmp_path / "r").exists()


def test_resume_appends_and_dedupes(tmp_path):
    cfg = LoggingConfig(wandb=False, console=False)
    with MetricsLogger(cfg, str(tmp_path), job_type="dense") as lg:
        for s in (1, 2, 3):
            lg.log(s, {keys.LM_LOSS: float(s)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "los')  # job killed mid-write
    with MetricsLogger(cfg, str(tmp_path), job_type="dense") as lg:  # resumed from step 2
        for s in (3, 4):
            lg.log(s, {keys.LM_LOSS: 10.0 * s})
    recs = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [(r["step"], r[keys.LM_LOSS]) for r in recs] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert len(read_metrics(str(tmp_path / "metrics.jsonl"), dedupe=False)) == 5


def test_console_line_formats_and_skips_missing():
    line = console_line(1200, 50000, {
        keys.PCT: 2.4, keys.CONSUMED_TOKENS: 1.26e9, keys.LM_LOSS: 2.34567, keys.INDEXER_KL: 0.0123,
        keys.LR: 3e-4, keys.GRAD_NORM: 0.87, keys.TOKENS_PER_SEC_PER_GPU: 12345.0,
        keys.TFLOPS_PER_GPU: 412.3, keys.MFU: 0.417, keys.ETA: 3 * 3600 + 7 * 60}, stage="sparse")
    assert line == ("[sparse] step 1200/50000 2.40% | tok 1.26B | loss 2.3457 | kl 1.230e-02 | "
                    "lr 3.00e-04 | gnorm 0.870 | 12.35K tok/s/gpu | 412.3 TFLOP/s/gpu mfu 41.7% | "
                    "eta 3h07m")
    bare = console_line(5, None, {keys.LM_LOSS: 1.0})
    assert bare == "step 5 | loss 1.0000" and "mfu" not in bare


def test_progress_eta_uses_recent_window():
    clock = FakeClock()
    p = RunProgress(total_tokens=1000, start_tokens=100, window=3, clock=clock)
    assert keys.ETA not in p.update(100)  # no time has passed: unknown, not zero or inf
    for _ in range(5):  # 10 tok/s
        clock.t += 1
        p.update(p.consumed_tokens + 10)
    for _ in range(3):  # 100 tok/s after a stage switch: window forgets the slow phase
        clock.t += 1
        m = p.update(p.consumed_tokens + 100)
    assert m[keys.PCT] == pytest.approx(45.0)
    assert m[keys.ETA] == pytest.approx(550 / 100)
    with pytest.raises(ValueError, match="total_tokens"):
        RunProgress(total_tokens=0)
    with pytest.raises(ValueError, match="backwards"):
        p.update(10)
    assert format_duration(45) == "45s" and format_duration(2 * 86400 + 4 * 3600) == "2d04h"
    assert format_duration(None) == "?"


def test_peaks_and_unknown_device_has_no_mfu():
    assert lookup_peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert lookup_peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert lookup_peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert lookup_peak_tflops("NVIDIA A100-SXM4-80GB") == pytest.approx(312.0)
    assert lookup_peak_tflops("NVIDIA GeForce GTX 1080") is None
    assert resolve_peak_tflops(override=500.0, device_name="whatever") == 500.0
    assert resolve_peak_tflops(device_name="Mystery Accelerator 9000") is None
    with pytest.raises(ValueError, match="peak_tflops"):
        resolve_peak_tflops(override=-1.0)
    rates = ThroughputMeter(2, FlopsPerToken(1e9, 2e9), peak_tflops=None).rates(1000, 1.0)
    assert keys.TFLOPS_PER_GPU in rates and keys.MFU not in rates


def test_bad_logging_config_names_field(tmp_path):
    with pytest.raises(ValueError, match="logging.mode"):
        MetricsLogger(LoggingConfig(mode="sometimes"), str(tmp_path))
    with pytest.raises(ValueError, match="logging.log_interval"):
        MetricsLogger(LoggingConfig(log_interval=0), str(tmp_path))


def test_metric_values_must_be_numbers(tmp_path):
    with MetricsLogger(LoggingConfig(wandb=False, console=False), str(tmp_path)) as lg:
        with pytest.raises(TypeError, match="not a number"):
            lg.log(1, {keys.LM_LOSS: [1.0]})
        lg.log(2, {keys.LM_LOSS: None, keys.LR: 1e-3})  # None = metric does not apply
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert keys.LM_LOSS not in rec and rec[keys.LR] == 1e-3
