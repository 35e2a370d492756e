"""Pictures: training curves with the stage boundary, and the sparse-pattern heatmap, as valid PNGs."""
import numpy as np
import pytest

from msa_train.metrics import LoggingConfig, MetricsLogger, keys, plot_run
from msa_train.metrics.jsonl import read_metrics
from msa_train.metrics.pattern import plot_selection, selection_frequency
from msa_train.metrics.plots import stage_boundaries

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path, min_w=200, min_h=200):
    from PIL import Image

    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        assert w >= min_w and h >= min_h
        # Not a blank canvas: a plot has many distinct colours.
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 10


def _two_stage_run(run_dir):
    cfg = LoggingConfig(wandb=False, console=False)
    with MetricsLogger(cfg, run_dir, job_type="dense") as lg:
        for s in range(1, 21):
            lg.log(s, {keys.LM_LOSS: 5.0 / s ** 0.3, keys.INDEXER_KL: 2.0 / s})
    with MetricsLogger(cfg, run_dir, job_type="sparse") as lg:
        for s in range(21, 41):
            lg.log(s, {keys.LM_LOSS: 5.0 / s ** 0.3, keys.INDEXER_KL: 0.2 + 0.01 * np.sin(s)})


def test_plot_run_png_with_stage_boundary(tmp_path):
    run_dir = str(tmp_path)
    _two_stage_run(run_dir)
    recs = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert stage_boundaries(recs) == [(21, "dense", "sparse")]
    out = plot_run(run_dir)
    assert out == str(tmp_path / "training_curves.png")
    _assert_png(out)


def test_plot_run_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics"):
        plot_run(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "stage": "dense", "train/lr": 0.1}\n')
    with pytest.raises(ValueError, match="train/lm_loss"):
        plot_run(str(tmp_path))


def test_selection_frequency_and_heatmap(tmp_path):
    # 2 groups, 5 blocks of 4 tokens (last block partial: 18 tokens), top-3
    block, t, k = 4, 18, 3
    idx = np.full((2, t, k), -1, dtype=np.int32)
    for i in range(t):
        qb = i // block
        idx[0, i, :min(k, qb + 1)] = sorted({0, qb} | ({qb - 1} if qb >= 2 else set()))[:k]
        idx[1, i, 0] = qb
    f = selection_frequency(idx, t, block)
    assert f.shape == (2, 5, 5)
    assert np.allclose(np.diagonal(f[1]), 1.0) and f[1].sum() == pytest.approx(5.0)
    assert np.allclose(f[0][:, 0], 1.0)  # sink column
    with pytest.raises(ValueError, match="seq_len"):
        selection_frequency(idx, t + 1, block)
    out = plot_selection({3: f, 7: f[::-1]}, str(tmp_path / "pattern.png"), title="t")
    _assert_png(out)
