#!/usr/bin/env python3
"""Small-scale replication of the MSA paper's claims (docs/REPLICATION.md).

    python tools/replicate.py --size cpu --out runs/replicate_cpu --check   # CI, a few CPU minutes
    python tools/replicate.py --size gpu --out runs/replicate_gpu           # one GPU, 4K context

Trains the dense baseline, MSA-PT, MSA-CPT, dense continued and three ablations (no indexer
warmup, no stop-gradient, fixed sink + local window) with msa-train, evaluates each final
checkpoint with msa-eval, and writes OUT/replication.json, OUT/REPLICATION_RESULTS.md and PNGs.
A re-run skips finished variants and resumes an interrupted one from its checkpoint.
--check exits 1 unless the robust facts hold: the indexer KL falls during the warmup and the
indexer's block recall beats a random selection's expected recall.
"""
import argparse
import os
import sys
import warnings

warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")


def main(argv=None) -> int:
    from msa_train.eval import replicate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", required=True, choices=sorted(replicate.SIZES))
    ap.add_argument("--out", required=True, help="output directory: one run dir per variant")
    ap.add_argument("--variants", default=None,
                    help="comma-separated subset (the runs they start from are added); default all")
    ap.add_argument("--device", default=None, choices=("cpu", "cuda"),
                    help="training and eval device (default: cuda when available)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply every stage's steps (e.g. 2 on a faster card); use a new --out")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 unless the KL falls in warmup and block recall beats random")
    ap.add_argument("overrides", nargs="*",
                    help="extra Hydra overrides for every training run (e.g. data.paths=[...])")
    a = ap.parse_args(argv)
    try:
        size = replicate.scaled(replicate.SIZES[a.size], a.scale)
    except ValueError as err:
        ap.error(str(err))
    names = [n.strip() for n in a.variants.split(",") if n.strip()] if a.variants else None
    try:
        summary = replicate.run_all(size, a.out, names, device=a.device, extra=a.overrides)
    except (ValueError, RuntimeError) as err:
        print(f"replicate: {err}", file=sys.stderr)
        return 2
    for c in summary["claims"]:
        print(f"{c['verdict']:>18}: {c['claim']}: {c['measured']}")
    print(f"replicate: wrote {os.path.join(a.out, replicate.RESULTS_MD)}")
    if a.check:
        failures = replicate.check(summary)
        for f in failures:
            print(f"replicate --check FAILED: {f}", file=sys.stderr)
        if failures:
            return 1
        print("replicate --check: KL falls during the warmup; block recall beats random selection")
    return 0


if __name__ == "__main__":
    sys.exit(main())
