#!/usr/bin/env python3
"""LM loss and indexer-KL curves of a run, with the warmup -> sparse boundary marked.

    python tools/plot_run.py <run_dir | metrics.jsonl> [-o out.png] [--smooth 20]

Reads the run's own metrics.jsonl (no wandb needed). The trainer calls the same function,
msa_train.metrics.plots.plot_run, at the end of training.
"""
import argparse
import sys

from msa_train.metrics.plots import plot_run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="run directory (holding metrics.jsonl) or a metrics .jsonl file")
    p.add_argument("-o", "--out", default=None, help="PNG path (default: <run_dir>/training_curves.png)")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window in log records")
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)
    if a.smooth < 1:
        p.error("--smooth must be >= 1")
    print(plot_run(a.path, a.out, title=a.title, smooth=a.smooth))
    return 0


if __name__ == "__main__":
    sys.exit(main())
