#!/usr/bin/env python
"""Per-kernel GPU time of one MSA layer's kernel work (select_blocks + sparse attention + indexer KL,
forward and backward), next to cuDNN dense attention forward + backward on the same shapes.

    python scripts/gpu_profile_layer.py [--hq 16 --hkv 4] [--seq 32768] [--pattern mix] [--out DIR]

Tells which kernel of the sparse stage costs what (torch.profiler, mean over --reps iterations after
warmup), so an optimization can be predicted against the right number. CUDA only; a script, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def kernel_table(fn, reps: int):
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    times = defaultdict(float)
    calls = defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            times[ev.name] += ev.device_time / 1000.0 / reps
            calls[ev.name] += 1
    rows = sorted(times.items(), key=lambda kv: -kv[1])
    return [{"kernel": k[:90], "ms": round(v, 3), "calls": calls[k] // reps} for k, v in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hq", type=int, default=16)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--pattern", default="mix")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--top", type=int, default=25, help="kernels listed per run")
    a = ap.parse_args()
    import msa_kernels as mk
    from msa_kernels.bench import make_pattern, time_ms

    dev = torch.device("cuda")
    t, hq, hkv = a.seq, a.hq, a.hkv
    g = torch.Generator(device=dev).manual_seed(7)
    cu = torch.tensor([0, t], dtype=torch.int32, device=dev)
    sel = make_pattern(a.pattern, t, hkv, 16, 128, dev, seed=3)
    shapes = ((t, hq, 128), (t, hkv, 128), (t, hkv, 128), (t, hkv, 128), (t, 128))
    q, k, v, qi, ki = (torch.randn(s, generator=g, device=dev, dtype=torch.bfloat16).requires_grad_()
                       for s in shapes)
    go = torch.randn((t, hq, 128), generator=g, device=dev, dtype=torch.bfloat16)
    xs = [q, k, v, qi, ki]

    def msa_layer():
        # select_blocks is timed but its ids are not used: random index vectors select near-random
        # blocks (the unfused path); the attention + KL run on the trained-indexer-like "mix" pattern.
        with torch.no_grad():
            mk.select_blocks(qi, ki, cu, 128, 16)
        out, _, kl = mk.sparse_attention_and_kl(q, k, v, sel, qi, ki, cu, 128)
        torch.autograd.backward([out, kl], [go, torch.ones_like(kl)], inputs=xs)

    def dense_layer():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qd, kd, vd = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
        out.backward(go.transpose(0, 1).unsqueeze(0))

    card = torch.cuda.get_device_name(0)
    res = {"card": card, "torch": torch.__version__, "heads": f"{hq}/{hkv}", "T": t, "pattern": a.pattern}
    names = ("msa", "dense_cudnn")
    for name, fn in zip(names, (msa_layer, dense_layer)):
        try:
            res[f"{name}_ms"] = round(time_ms(fn, budget_ms=500), 3)
            res[f"{name}_kernels"] = kernel_table(fn, a.reps)
        except Exception as e:  # noqa: BLE001 - report and keep the other row
            res[f"{name}_error"] = f"{type(e).__name__}: {e}"
    print(f"card: {card}; {hq}/{hkv} heads, T={t}, pattern {a.pattern}")
    for name in names:
        print(f"\n{name}: {res.get(f'{name}_ms')} ms per fwd+bwd (CUDA events, median)")
        if f"{name}_error" in res:
            print("  FAILED:", res[f"{name}_error"])
        for row in res.get(f"{name}_kernels", [])[:a.top]:
            print(f"  {row['ms']:8.3f} ms  x{row['calls']:<3d} {row['kernel']}")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"layer_{hq}_{hkv}_{t}_{a.pattern}.json"), "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
