"""Data-loader throughput: can the input pipeline keep up with the model?

  python -m msa_train.data.bench --seq-length 8192 --micro-batch-size 4 --workers 0 2

Builds the embedded stdlib corpus (or --paths prefixes), then times the first batch (index build /
cache load) and the steady-state rate in tokens/s for each worker count. Training needs at most
(tokens per step) / (step time); on one GPU that is ~1e5-1e6 tokens/s for the models here.
"""

from __future__ import annotations

import argparse
import itertools
import time
import warnings


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="time the msa-train data loader")
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--paths", nargs="*", default=[], help="indexed prefixes (default: stdlib)")
    p.add_argument("--cache-dir", default=None, help="stdlib corpus cache root")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")

    import torch

    from msa_train.data import (DataConfig, build_data_loader, build_datasets, build_tokenizer,
                                collator_for, ensure_stdlib_corpus)

    cfg = DataConfig(source="indexed" if args.paths else "stdlib", paths=list(args.paths),
                     split="1,0,0")
    cfg.stdlib.cache_dir = args.cache_dir
    t0 = time.perf_counter()
    if not args.paths:
        corpus = ensure_stdlib_corpus(cfg.stdlib)
        print(f"{corpus.line()} ({time.perf_counter() - t0:.2f}s)")
    tok = build_tokenizer(cfg.tokenizer)
    n = args.batches * args.micro_batch_size
    t0 = time.perf_counter()
    train, _, _ = build_datasets(cfg, tok, args.seq_length, 1234, n, 0)
    print(f"datasets: {len(train):,} train samples of {args.seq_length} tokens "
          f"({time.perf_counter() - t0:.2f}s incl. index build/load)")
    cuda = torch.cuda.is_available()
    for workers in args.workers:
        loader = build_data_loader(train, 0, args.micro_batch_size, 0, 1, workers,
                                   collator_for(cfg, tok))
        t0 = time.perf_counter()
        it = iter(loader)
        batch = next(it)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        count = 0
        for batch in itertools.islice(it, args.batches - 1):
            if cuda:  # include the host-to-device copy the trainer pays
                batch["tokens"].cuda(non_blocking=True)
            count += 1
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rate = count * args.micro_batch_size * args.seq_length / max(dt, 1e-9)
        print(f"workers={workers}: first batch {first * 1e3:.0f} ms, {count} batches in {dt:.2f}s "
              f"= {rate / 1e6:.2f}M tokens/s{' (pinned, to GPU)' if cuda else ''}")


if __name__ == "__main__":
    main()
