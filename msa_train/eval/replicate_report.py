"""replication.json, REPLICATION_RESULTS.md and the figures of tools/replicate.py."""
from __future__ import annotations

import json
import os
from typing import Dict, List

from msa_train.eval.replicate import RESULTS_JSON, RESULTS_MD

FIGURES = ("loss_curves.png", "kl_curves.png", "ppl_by_position.png", "retrieval.png",
           "recall_per_layer.png")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _smooth(ys: List[float], window: int = 5) -> List[float]:
    out, acc = [], []
    for y in ys:
        acc.append(y)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc))
    return out


def plot_curves(summary: Dict, key: str, ylabel: str, path: str, log: bool = False) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, v in summary["variants"].items():
        pts = [(s, y) for s, y in zip(v["curves"]["step"], v["curves"][key]) if y is not None]
        if not pts:
            continue
        offset = summary["variants"][v["init_from"]]["warmup_steps"] + \
            summary["variants"][v["init_from"]]["sparse_steps"] if v["init_from"] else 0
        xs = [(s + offset) * summary["tokens_per_step"] / 1e3 for s, _ in pts]
        ax.plot(xs, _smooth([y for _, y in pts]), label=v["label"],
                linestyle="--" if v["init_from"] else "-")
    pt = summary["variants"].get("msa_pt")
    if pt and pt["warmup_steps"]:
        ax.axvline(pt["warmup_steps"] * summary["tokens_per_step"] / 1e3, color="grey", lw=0.8,
                   ls=":", label="warmup -> sparse")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("training tokens (thousands; continued runs after the dense baseline's)")
    ax.set_ylabel(ylabel + " (5-step mean)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_ppl(summary: Dict, path: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, v in summary["variants"].items():
        ppl = (v["eval"].get("perplexity") or {}).get("sparse" if v["msa"] else "dense")
        if not ppl:
            continue
        xs = [(b["start"] + b["end"]) / 2 for b in ppl["by_position"]]
        ax.plot(xs, [b["ppl"] for b in ppl["by_position"]], marker="o", label=v["label"],
                linestyle="--" if v["init_from"] else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in sequence (bucket centre)")
    ax.set_ylabel("validation perplexity")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_retrieval(summary: Dict, path: str) -> str:
    plt = _plt()
    names = [n for n, v in summary["variants"].items() if v["eval"].get("retrieval")]
    tasks = sorted({t for n in names for t in summary["variants"][n]["eval"]["retrieval"]})
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        per = summary["variants"][n]["eval"]["retrieval"]
        accs = []
        for t in tasks:  # mean over lengths
            vals = [r["accuracy"] for r in (per.get(t) or {}).values()]
            accs.append(sum(vals) / len(vals) if vals else 0.0)
        ax.bar([j + i * width for j in range(len(tasks))], accs, width,
               label=summary["variants"][n]["label"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("exact-match accuracy")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_recall(summary: Dict, path: str) -> str:
    plt = _plt()
    names = [n for n, v in summary["variants"].items() if v["eval"].get("recall")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key in zip(axes, ("block_recall", "score_recall")):
        for n in names:
            rec = summary["variants"][n]["eval"]["recall"]
            layers = list(rec)
            ax.plot([int(layer.split("_")[1]) for layer in layers], [rec[layer][key] for layer in layers],
                    marker="o", label=summary["variants"][n]["label"])
        if key == "block_recall":
            ax.axhline(summary["random_block_recall"], color="grey", ls=":",
                       label="random selection (upper bound)")
        elif "uniform_score_recall" in summary:
            ax.axhline(summary["uniform_score_recall"], color="grey", ls=":",
                       label="any selection, uniform attention")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("MSA layer (0-based)")
        ax.set_ylabel(key.replace("_", " "))
        ax.legend(fontsize=7)
    return _save(fig, path)


def _f(x, fmt: str = ".3f") -> str:
    return "" if x is None else format(x, fmt)


def markdown(summary: Dict) -> str:
    var = summary["variants"]
    lines = [f"# MSA replication, size `{summary['size']}`", "",
             f"Context {summary['seq_length']} tokens, blocks of {summary['block_size']}, "
             f"top-{summary['topk']}; {summary['tokens_per_step']} tokens per step.", "",
             "## Paper claims", "", "| claim | paper | measured | verdict |", "|---|---|---|---|"]
    for c in summary["claims"]:
        lines.append(f"| {c['claim']} | {c['paper']} | {c['measured']} | **{c['verdict']}** |")
    lines += ["", "## Variants", "",
              "| variant | steps (warmup + sparse) | tokens | final train loss | val ppl | ppl, MSA "
              "layers dense | block recall | score recall | KL warmup start -> end | KL sparse end "
              "| train s | eval s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, v in var.items():
        k = v["kl"]
        kl_w = f"{k['warmup_start']:.3g} -> {k['warmup_end']:.3g}" if "warmup_start" in k else ""
        start = f" from {v['init_from']}" if v["init_from"] else ""
        lines.append(
            f"| {v['label']} (`{n}`){start} | {v['warmup_steps']} + {v['sparse_steps']} | "
            f"{v['tokens']} | {_f(v['final_train_loss'])} | {_f(v['ppl'])} | "
            f"{_f(v['ppl_dense_mode']) if v['msa'] else ''} | {_f(v.get('block_recall'))} | "
            f"{_f(v.get('score_recall'))} | {kl_w} | {_f(k.get('sparse_end'), '.3g')} | "
            f"{v['timing'].get('train_s', '')} | {v['timing'].get('eval_s', '')} |")
    lines += ["", f"Random selection's expected block recall (upper bound, same query rows): "
              f"{summary['random_block_recall']:.3f}. Score recall of any selection if the main "
              f"branch attended uniformly: {summary.get('uniform_score_recall', float('nan')):.3f}.",
              ""]
    retrieval_rows = []
    for n, v in var.items():
        for task, per in (v["eval"].get("retrieval") or {}).items():
            for length, r in per.items():
                retrieval_rows.append(f"| {v['label']} | {task} | {length} | {r['accuracy']:.2f} "
                                      f"(n={r['n']}) |")
    if retrieval_rows:
        lines += ["## Retrieval (greedy exact match)", "", "| variant | task | length | accuracy |",
                  "|---|---|---|---|", *retrieval_rows, ""]
    lines += ["## Figures", ""] + [f"![{f}]({f})" for f in FIGURES] + [""]
    lines += ["## Commands", ""] + [f"- `{n}`: `{v['command']}`" for n, v in var.items()]
    return "\n".join(lines) + "\n"


def write_all(summary: Dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, RESULTS_JSON), "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    plot_curves(summary, "lm_loss", "LM loss", os.path.join(out_dir, FIGURES[0]))
    plot_curves(summary, "indexer_kl", "indexer KL", os.path.join(out_dir, FIGURES[1]), log=True)
    plot_ppl(summary, os.path.join(out_dir, FIGURES[2]))
    plot_retrieval(summary, os.path.join(out_dir, FIGURES[3]))
    plot_recall(summary, os.path.join(out_dir, FIGURES[4]))
    with open(os.path.join(out_dir, RESULTS_MD), "w") as f:
        f.write(markdown(summary))
