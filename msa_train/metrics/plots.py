"""Pictures of a run: LM loss and indexer-KL curves with the stage boundary marked.

    from msa_train.metrics.plots import plot_run
    png = plot_run(run_dir_or_metrics_jsonl)          # -> <run_dir>/training_curves.png

Reads only the run's jsonl metrics file, so it works offline, without wandb, and on a laptop
after copying one file. The trainer calls it at the end of training (logging.plot_at_end);
tools/plot_run.py is the command-line form.
"""
from __future__ import annotations

import os
from typing import Optional

from msa_train.metrics import keys
from msa_train.metrics.jsonl import METRICS_FILENAME, read_metrics, series

CURVES_FILENAME = "training_curves.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: compute nodes and CI have no display
    import matplotlib.pyplot as plt

    return plt


def stage_boundaries(records: list[dict]) -> list[tuple[int, str, str]]:
    """(first step of the new stage, old stage, new stage) for every stage change, in step order."""
    out = []
    prev = None
    for r in records:
        st = r.get("stage")
        if st is None:
            continue
        if prev is not None and st != prev:
            out.append((int(r["step"]), prev, st))
        prev = st
    return out


def _smooth(ys: list[float], window: int) -> list[float]:
    if window <= 1 or len(ys) < 3:
        return ys
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_run(path: str, out_path: Optional[str] = None, title: Optional[str] = None,
             smooth: int = 1) -> str:
    """Draw LM loss and indexer KL vs step; returns the PNG path.

    path: a run directory (its metrics.jsonl is used) or a metrics jsonl file.
    smooth: trailing moving-average window in records (1 = raw).
    """
    metrics_path = os.path.join(path, METRICS_FILENAME) if os.path.isdir(path) else path
    if not os.path.exists(metrics_path):
        raise FileNotFoundError(f"no metrics file at {metrics_path} (pass a run dir or a metrics .jsonl)")
    records = read_metrics(metrics_path, dedupe=True)
    loss_x, loss_y = series(records, keys.LM_LOSS)
    kl_x, kl_y = series(records, keys.INDEXER_KL)
    if not loss_x and not kl_x:
        raise ValueError(f"{metrics_path} has no {keys.LM_LOSS} or {keys.INDEXER_KL} records to plot")
    if out_path is None:
        out_path = os.path.join(os.path.dirname(os.path.abspath(metrics_path)), CURVES_FILENAME)

    plt = _pyplot()
    fig, (ax_loss, ax_kl) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    try:
        if loss_x:
            ax_loss.plot(loss_x, _smooth(loss_y, smooth), lw=1.2, color="tab:blue", label="LM loss")
        else:
            ax_loss.text(0.5, 0.5, "no LM loss logged", ha="center", va="center",
                         transform=ax_loss.transAxes)
        ax_loss.set_ylabel("LM loss")
        if kl_x:
            ax_kl.plot(kl_x, _smooth(kl_y, smooth), lw=1.2, color="tab:red",
                       label="indexer KL (mean over MSA layers)")
            if min(kl_y) > 0:
                ax_kl.set_yscale("log")  # KL falls by orders of magnitude during warmup
        else:
            ax_kl.text(0.5, 0.5, "no indexer KL logged (dense model?)", ha="center", va="center",
                       transform=ax_kl.transAxes)
        ax_kl.set_ylabel("indexer KL")
        ax_kl.set_xlabel("step")
        for step, old, new in stage_boundaries(records):
            for ax in (ax_loss, ax_kl):
                ax.axvline(step, color="black", ls="--", lw=1.0)
            ax_loss.annotate(f"{old} -> {new}", xy=(step, 1.0), xycoords=("data", "axes fraction"),
                             xytext=(4, -12), textcoords="offset points", fontsize=8)
        for ax in (ax_loss, ax_kl):
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="upper right", fontsize=8)
        fig.suptitle(title or os.path.basename(os.path.dirname(os.path.abspath(metrics_path))))
        fig.tight_layout()
        fig.savefig(out_path, dpi=120)
    finally:
        plt.close(fig)
    return out_path
