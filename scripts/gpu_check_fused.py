#!/usr/bin/env python
"""GPU check + timing of the fused sparse-attention + indexer-KL node (one device call).

    python scripts/gpu_check_fused.py [--out DIR]

1. pytest -m gpu tests/kernels/test_fused_kl_triton.py (bf16 vs fp32 reference, both modes).
2. At 32K tokens, "mix" selection (kernels/bench.py), for 64/8 and 16/4 heads (d = Di = 128, block
   128, top-16): the unfused ops (sparse fwd + bwd, then indexer_kl fwd + bwd) against the fused node
   with the backward's key tile at 128 (default) and 64 rows, same run, CUDA-event medians.
Results go to kernels/BENCHMARKS.md by hand, with the card name printed here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timings(hq: int, hkv: int, t: int) -> dict:
    import msa_kernels as mk
    from msa_kernels.bench import make_pattern, time_ms
    from msa_kernels.kl import fused
    from msa_kernels.tuning import bwd_config

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(7)
    cu = torch.tensor([0, t], dtype=torch.int32, device=dev)
    sel = make_pattern("mix", t, hkv, 16, 128, dev, seed=3)
    shapes = ((t, hq, 128), (t, hkv, 128), (t, hkv, 128), (t, hkv, 128), (t, 128))
    q, k, v, qi, ki = (torch.randn(s, generator=g, device=dev, dtype=torch.bfloat16).requires_grad_() for s in shapes)
    go = torch.randn((t, hq, 128), generator=g, device=dev, dtype=torch.bfloat16)
    xs = (q, k, v, qi, ki)

    def unfused():
        out, lse = mk.sparse_attention(q, k, v, sel, cu, 128)
        kl = mk.indexer_kl(q.detach(), k.detach(), lse.detach(), qi, ki, sel, cu, 128)
        torch.autograd.backward([out, kl], [go, torch.ones_like(kl)], inputs=list(xs))

    node = []

    def fused_step():
        out, _, kl = mk.sparse_attention_and_kl(q, k, v, sel, qi, ki, cu, 128)
        node[:] = [type(out.grad_fn).__name__]
        torch.autograd.backward([out, kl], [go, torch.ones_like(kl)], inputs=list(xs))

    res = {"heads": f"{hq}/{hkv}", "T": t, "unfused_ms": time_ms(unfused, budget_ms=400)}
    lay = mk.make_layout(cu, total_keys=t)
    for bn in (128, 64):
        bcfg = dataclasses.replace(bwd_config(128, hq // hkv, 128), block_n=bn)

        def swept():
            out, _, kl = fused.sparse_attention_kl_triton(q, k, v, sel, qi, ki, lay, block_size=128,
                                                          scale=128 ** -0.5, index_scale=128 ** -0.5,
                                                          check_ids=False, bwd_cfg=bcfg)
            torch.autograd.backward([out, kl], [go, torch.ones_like(kl)], inputs=list(xs))
        res[f"fused_bn{bn}_ms"] = time_ms(swept, budget_ms=400)
    res["fused_default_ms"] = time_ms(fused_step, budget_ms=400)
    res["node"] = node[0] if node else None
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--seq", type=int, default=32768)
    a = ap.parse_args()
    print("card:", torch.cuda.get_device_name(0), "torch", torch.__version__, flush=True)
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                          "tests/kernels/test_fused_kl_triton.py", "-o", "timeout=0"], cwd=REPO)
    print(f"pytest gpu fused: rc={rc}", flush=True)
    rows = [timings(64, 8, a.seq), timings(16, 4, a.seq)]
    for r in rows:
        print(json.dumps(r), flush=True)
    if a.out:
        with open(os.path.join(a.out, "fused.json"), "w") as f:
            json.dump({"card": torch.cuda.get_device_name(0), "pytest_rc": rc, "rows": rows}, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
