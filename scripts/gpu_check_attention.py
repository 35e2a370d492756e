"""One device call for the sparse-attention kernels: GPU parity tests, then tile-config variants.

    PYTHONUNBUFFERED=1 python3 scripts/gpu_check_attention.py --out $OUT [--bench] [--skip-tests]

1. pytest -m gpu tests/kernels/test_attention_triton.py (8K-32K, 64/4 and 64/8, bf16 vs fp32
   reference, deterministic mode, int64 offsets) -> <out>/attn_pytest.log
2. each forward / backward tile config on the ``mix`` and ``random`` patterns at 32K and 128K
   (64/8 heads, d=128, block 128, top-16), with a parity check of every variant at 8K first and the
   host-side schedule costs split out -> <out>/attn_variants.json
3. --bench: python -m msa_kernels.bench (whole table) -> <out>/bench.json, <out>/bench.md
Timings of a variant whose parity check failed are printed as FAILED, never as a result.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch


def log(f, msg):
    print(msg, flush=True)
    f.write(msg + "\n")
    f.flush()


def run_tests(out_dir, logf) -> bool:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           "tests/kernels/test_attention_triton.py", "-o", "timeout=0"]
    t0 = time.time()
    with open(os.path.join(out_dir, "attn_pytest.log"), "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    tail = open(os.path.join(out_dir, "attn_pytest.log")).read().splitlines()[-15:]
    log(logf, f"pytest gpu: rc={rc} in {time.time() - t0:.0f} s\n  " + "\n  ".join(tail))
    return rc == 0


def variants(args, out_dir, logf):
    import msa_kernels as mk
    from msa_kernels.attention import triton_common as tc
    from msa_kernels.attention import triton_fwd as tf
    from msa_kernels.attention.naive import sparse_attention_ref, check_topk_ids
    from msa_kernels.bench import make_pattern, sparse_pairs, time_ms

    dev = torch.device("cuda")
    hq, hkv, d, bs, k = args.hq, args.hkv, 128, 128, 16
    # Round 3 sweep (rounds 1-2 are logged in kernels/BENCHMARKS.md): 128-key KV steps.
    fwd_cfgs = [tc.FwdConfig(*c) for c in [(64, 64, 4, 3)]]
    bwd_cfgs = [tc.BwdConfig(*c[:5], **c[5]) for c in [
        (32, 64, 4, 3, 512, {}),  # default: dq_mode auto
        (32, 128, 8, 2, 512, {}),
        (64, 128, 8, 2, 512, {}),
        (32, 128, 8, 3, 512, {}),
        (16, 64, 4, 3, 512, {}),
        (32, 64, 4, 3, 1024, {}),
    ]]
    results = {"card": torch.cuda.get_device_name(), "fwd": [], "bwd": [], "prep": []}

    # parity of every variant at 8K (packed, mix pattern) before any timing
    t = 8192
    g = torch.Generator(device=dev).manual_seed(0)
    sel = torch.cat([make_pattern("mix", 5000, hkv, k, bs, dev, seed=1), make_pattern("random", 3192, hkv, k, bs, dev,
                                                                                    seed=2)], 1)
    cu = torch.tensor([0, 5000, t], dtype=torch.int32, device=dev)
    lay = mk.make_layout(cu, total_keys=t)
    check_topk_ids(sel, lay, bs)
    q, kk, v = (torch.randn((t, h, d), generator=g, device=dev, dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    go = torch.randn((t, hq, d), generator=g, device=dev, dtype=torch.bfloat16)
    rs = [x.float().requires_grad_() for x in (q, kk, v)]
    ro, rl = sparse_attention_ref(*rs, sel, lay, block_size=bs, scale=d ** -0.5)
    ro.backward(go.float())

    def rel(a, b):
        return float((a.float() - b).norm() / b.norm())

    bad = set()
    for fc in fwd_cfgs:
        for bc in bwd_cfgs[:1] if fc is not fwd_cfgs[0] else bwd_cfgs:
            for det in (False, True) if (fc is fwd_cfgs[0] and bc is bwd_cfgs[0]) else (False,):
                xs = [x.clone().requires_grad_() for x in (q, kk, v)]
                o, l = tf.sparse_attention_triton(*xs, sel, lay, block_size=bs, scale=d ** -0.5, deterministic=det,
                                                  fwd_cfg=fc, bwd_cfg=bc)
                o.backward(go)
                errs = [rel(o, ro), rel(l, rl)] + [rel(x.grad, r.grad) for x, r in zip(xs, rs)]
                okv = max(errs) < 1.5e-2 and not any(e != e for e in errs)
                if not okv:
                    bad.add((repr(fc), repr(bc), det))
                log(logf, f"parity {fc} {bc} det={det}: {'ok' if okv else 'FAILED'} "
                          f"out/lse/dq/dk/dv rel err " + " ".join(f"{e:.1e}" for e in errs))
    del rs, ro, rl

    for t in args.lengths:
        cu = torch.tensor([0, t], dtype=torch.int32, device=dev)
        lay = mk.make_layout(cu, total_keys=t)
        q, kk, v = (torch.randn((t, h, d), generator=g, device=dev, dtype=torch.bfloat16).requires_grad_()
                    for h in (hq, hkv, hkv))
        go = torch.randn((t, hq, d), generator=g, device=dev, dtype=torch.bfloat16)
        for pattern in args.patterns:
            sel = make_pattern(pattern, t, hkv, k, bs, dev, seed=t)
            fl = 4 * d * (hq // hkv) * float(sparse_pairs(sel, bs).sum())
            # host-side schedule pieces, timed alone
            qk_rows = tc.query_key_rows(lay)
            blk = tc.block_key_rows(sel, lay, bs)
            prep = {"T": t, "pattern": pattern,
                    "check_topk_ids": time_ms(lambda: check_topk_ids(sel, lay, bs), budget_ms=100),
                    "q_tiles": time_ms(lambda: tc.build_q_tiles(blk, 8), budget_ms=100),
                    "kv_units": time_ms(lambda: tc.build_kv_units(blk, 512, t, -(-t // bs)), budget_ms=100)}
            tiles = tc.build_q_tiles(blk, 128 // (hq // hkv))
            prep["mean_union_blocks_per_tile"] = float(tiles.counts.float().mean())
            results["prep"].append(prep)
            log(logf, f"prep {t} {pattern}: " + " ".join(f"{a}={b:.3f}" if isinstance(b, float) else f"{a}={b}"
                                                          for a, b in prep.items()))
            del qk_rows, blk, tiles
            for fc in fwd_cfgs:
                key = (repr(fc), repr(bwd_cfgs[0]), False)
                ms = time_ms(lambda: tf.sparse_attention_triton(q, kk, v, sel, lay, block_size=bs, scale=d ** -0.5,
                                                                fwd_cfg=fc), budget_ms=args.budget_ms)
                row = {"T": t, "pattern": pattern, "cfg": repr(fc), "ms": ms, "tflops": fl / ms / 1e9,
                       "parity": "FAILED" if key in bad else "ok"}
                results["fwd"].append(row)
                log(logf, f"fwd {t} {pattern} {fc}: {ms:.3f} ms {fl / ms / 1e9:.0f} TF/s {row['parity']}")
            for bc in bwd_cfgs:
                for det in (False, True) if bc is bwd_cfgs[0] else (False,):
                    o, _ = tf.sparse_attention_triton(q, kk, v, sel, lay, block_size=bs, scale=d ** -0.5,
                                                      deterministic=det, bwd_cfg=bc)
                    ms = time_ms(lambda: torch.autograd.grad(o, (q, kk, v), go, retain_graph=True),
                                 budget_ms=args.budget_ms)
                    key = (repr(fwd_cfgs[0]), repr(bc), det)
                    row = {"T": t, "pattern": pattern, "cfg": repr(bc), "det": det, "ms": ms,
                           "tflops": 2.5 * fl / ms / 1e9, "parity": "FAILED" if key in bad else "ok"}
                    results["bwd"].append(row)
                    log(logf, f"bwd {t} {pattern} {bc} det={det}: {ms:.3f} ms {2.5 * fl / ms / 1e9:.0f} TF/s "
                              f"{row['parity']}")
                    del o
            torch.cuda.empty_cache()
        del q, kk, v, go
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "attn_variants.json"), "w") as f:
        json.dump(results, f, indent=1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-variants", action="store_true")
    p.add_argument("--bench", action="store_true")
    p.add_argument("--bench-args", default="")
    p.add_argument("--lengths", default="32768,131072")
    p.add_argument("--patterns", default="mix,random")
    p.add_argument("--hq", type=int, default=64)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--budget-ms", type=float, default=150.0)
    args = p.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.patterns = [x for x in args.patterns.split(",") if x]
    os.makedirs(args.out, exist_ok=True)
    import triton
    with open(os.path.join(args.out, "attn_check.log"), "a") as logf:
        log(logf, f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
        ok = True
        if not args.skip_tests:
            ok = run_tests(args.out, logf)
        if not args.skip_variants:
            variants(args, args.out, logf)
        if args.bench:
            # The bench writes bench.json and bench.md into --out itself; its log goes to bench.log.
            cmd = [sys.executable, "-m", "msa_kernels.bench", "--out", args.out] + args.bench_args.split()
            with open(os.path.join(args.out, "bench.log"), "w") as f:
                rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
            print(open(os.path.join(args.out, "bench.log")).read(), flush=True)
            ok = ok and rc == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
