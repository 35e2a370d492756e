"""results.json, results.md and the figures msa-eval writes (schema in the README)."""
from __future__ import annotations

import json
import os
from typing import Dict, List


def write_json(results: Dict, out_dir: str) -> str:
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2, sort_keys=False)
        f.write("\n")
    return path


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def write_markdown(results: Dict, out_dir: str, figures: List[str]) -> str:
    lines = [f"# msa-eval: {results['checkpoint']} (iteration {results['iteration']})", ""]
    ppl = results.get("perplexity") or {}
    if ppl:
        lines += ["## Perplexity by position", "", "| positions | " + " | ".join(ppl) + " |",
                  "|---|" + "---|" * len(ppl)]
        first = next(iter(ppl.values()))
        for i, bucket in enumerate(first["by_position"]):
            row = [_fmt(ppl[m]["by_position"][i]["ppl"]) for m in ppl]
            lines.append(f"| {bucket['start']}-{bucket['end']} | " + " | ".join(row) + " |")
        lines.append("| overall | " + " | ".join(_fmt(ppl[m]["overall"]) for m in ppl) + " |")
        lines.append("")
    for title, key in (("Retrieval (greedy exact match)", "retrieval"),):
        table = results.get(key) or {}
        if table:
            lengths = sorted({int(length) for per in table.values() for length in per})
            lines += [f"## {title}", "", "| task | " + " | ".join(str(n) for n in lengths) + " |",
                      "|---|" + "---|" * len(lengths)]
            for task, per in table.items():
                cells = [f"{per[str(n)]['accuracy']:.2f} (n={per[str(n)]['n']})" if str(n) in per
                         else "" for n in lengths]
                lines.append(f"| {task} | " + " | ".join(cells) + " |")
            lines.append("")
    recall = results.get("recall") or {}
    if recall:
        lines += ["## Indexer recall and KL per MSA layer", "",
                  "| layer | block recall | score recall | KL |", "|---|---|---|---|"]
        for layer, r in recall.items():
            lines.append(f"| {layer} | {r['block_recall']:.3f} | {r['score_recall']:.3f} | "
                         f"{r['kl']:.3g} |")
        lines.append("")
    tasks = results.get("tasks") or {}
    if tasks:
        lines += ["## Task files", "", "| task | accuracy | n | mean answer log-prob |",
                  "|---|---|---|---|"]
        for name, r in tasks.items():
            lines.append(f"| {name} | {r['accuracy']:.3f} | {r['n']} | {r['mean_answer_logprob']:.3f} |")
        lines.append("")
    if figures:
        lines += ["## Figures", ""] + [f"![{os.path.basename(f)}]({os.path.basename(f)})"
                                       for f in figures] + [""]
    path = os.path.join(out_dir, "results.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: str, name: str) -> str:
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def plot_perplexity(ppl: Dict, out_dir: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, r in ppl.items():
        xs = [(b["start"] + b["end"]) / 2 for b in r["by_position"]]
        ax.plot(xs, [b["ppl"] for b in r["by_position"]], marker="o", label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in sequence (bucket centre)")
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity by position")
    ax.legend()
    return _save(fig, out_dir, "perplexity_by_position.png")


def plot_retrieval(retrieval: Dict, out_dir: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for task, per in retrieval.items():
        lengths = sorted(int(n) for n in per)
        ax.plot(lengths, [per[str(n)]["accuracy"] for n in lengths], marker="o", label=task)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title("Retrieval")
    ax.legend()
    return _save(fig, out_dir, "retrieval.png")


def plot_recall(recall: Dict, out_dir: str) -> str:
    plt = _plt()
    layers = list(recall)
    xs = range(len(layers))
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(layers) + 2), 4))
    width = 0.4
    ax.bar([x - width / 2 for x in xs], [recall[l]["block_recall"] for l in layers], width,
           label="block recall")
    ax.bar([x + width / 2 for x in xs], [recall[l]["score_recall"] for l in layers], width,
           label="score recall")
    ax.set_xticks(list(xs), [l.replace("layer_", "") for l in layers])
    ax.set_xlabel("MSA layer")
    ax.set_ylim(0, 1.05)
    ax.set_title("Indexer recall against the main branch's top-k")
    ax.legend()
    return _save(fig, out_dir, "recall.png")
