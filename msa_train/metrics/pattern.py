"""Sparse-pattern heatmaps: which key blocks each GQA group selects per query block.

    counts = selection_frequency(topk_idx, seq_len, block_size)   # [Hkv, nq_blocks, nk_blocks]
    plot_selection(counts_by_layer, out_png)

Cell (qb, kb) of group r = fraction of the queries of query block qb whose selection includes key
block kb. The MSA paper's structures show up directly: the local diagonal (always selected), a
sink column at kb = 0 and group-specific long-range stripes. The model / checkpoint side lives in
msa_train/eval (`msa-eval --tasks patterns`); this module needs only the selected block ids of ONE
sequence.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np


def selection_frequency(topk_idx, seq_len: int, block_size: int) -> np.ndarray:
    """topk_idx: int [Hkv, T, k] block ids of one sequence (-1 = unused slot), T == seq_len.

    Returns float32 [Hkv, nb, nb] with nb = ceil(seq_len / block_size).
    """
    idx = np.asarray(topk_idx.cpu() if hasattr(topk_idx, "cpu") else topk_idx)
    if idx.ndim != 3:
        raise ValueError(f"topk_idx must be [Hkv, T, k], got shape {idx.shape}")
    hkv, t, _ = idx.shape
    if t != seq_len:
        raise ValueError(f"topk_idx covers {t} tokens but seq_len is {seq_len}")
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    nb = -(-seq_len // block_size)
    counts = np.zeros((hkv, nb, nb), dtype=np.float32)
    qblock = np.arange(t) // block_size  # [T]
    for r in range(hkv):
        sel = idx[r]  # [T, k]
        valid = sel >= 0
        if np.any(sel[valid] >= nb):
            raise ValueError(f"topk_idx has block id {int(sel.max())} >= number of blocks {nb}")
        rows = np.broadcast_to(qblock[:, None], sel.shape)[valid]
        np.add.at(counts[r], (rows, sel[valid]), 1.0)
    per_qblock = np.bincount(qblock, minlength=nb).astype(np.float32)  # queries per query block
    return counts / per_qblock[None, :, None]


def plot_selection(freq_by_layer: Mapping[int, np.ndarray], out_path: str,
                   title: str = "") -> str:
    """One row per layer, one column per GQA group; returns out_path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not freq_by_layer:
        raise ValueError("no layers to plot")
    layers = sorted(freq_by_layer)
    hkv = freq_by_layer[layers[0]].shape[0]
    fig, axes = plt.subplots(len(layers), hkv, figsize=(2.8 * hkv + 1, 2.8 * len(layers) + 0.6),
                             squeeze=False)
    try:
        im = None
        for i, layer in enumerate(layers):
            f = freq_by_layer[layer]
            for r in range(hkv):
                ax = axes[i][r]
                im = ax.imshow(f[r], cmap="viridis", vmin=0.0, vmax=1.0, origin="upper",
                               interpolation="nearest")
                ax.set_title(f"layer {layer} group {r}", fontsize=8)
                ax.set_xlabel("key block", fontsize=7)
                ax.set_ylabel("query block", fontsize=7)
                ax.tick_params(labelsize=6)
        fig.colorbar(im, ax=axes, shrink=0.8, label="fraction of queries selecting")
        if title:
            fig.suptitle(title)
        fig.savefig(out_path, dpi=110)
    finally:
        plt.close(fig)
    return out_path
