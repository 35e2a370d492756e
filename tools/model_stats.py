#!/usr/bin/env python
"""Print total / active parameters and per-token training FLOPs of a model config, without weights.

  python tools/model_stats.py msa_109b                     # configs/model/msa_109b.yaml
  python tools/model_stats.py pilot_10b --attention paper --seq-len 32768 131072
  python tools/model_stats.py path/to/model.yaml --build   # also build on the meta device and
                                                           # check the analytic count against it
Counts are analytic (msa_train.model.flops); FLOPs follow MSA_SPEC.md: dense-equivalent (full
attention everywhere, no index branch) vs MSA sparse (stage 2) and dense warmup (stage 1), with MoE
counted on the active (top-k + shared) experts only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load(group: str, name: str, schema):
    from omegaconf import OmegaConf

    path = Path(name)
    if not path.suffix:
        path = REPO / "configs" / group / f"{name}.yaml"
    if not path.exists():
        raise SystemExit(f"no {group} config {name!r} (looked for {path})")
    raw = OmegaConf.load(path)
    merged = OmegaConf.structured(schema)
    defaults = raw.pop("defaults", None)
    for d in defaults or []:
        if d != "_self_":
            merged = OmegaConf.merge(merged, OmegaConf.load(path.parent / f"{d}.yaml"))
    return OmegaConf.to_object(OmegaConf.merge(merged, raw))


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="configs/model name or a yaml path")
    p.add_argument("--attention", default=None, help="configs/attention name or yaml (default: "
                   "tiny for the tiny model, else paper)")
    p.add_argument("--seq-len", type=int, nargs="+", default=[4096, 32768, 131072, 1048576])
    p.add_argument("--build", action="store_true", help="also build on the meta device and compare")
    args = p.parse_args(argv)

    from msa_train.model.config import AttentionConfig, ModelConfig
    from msa_train.model.flops import attention_reduction, count_parameters, flops_breakdown

    model = _load("model", args.model, ModelConfig)
    attn_name = args.attention or ("tiny" if model.name == "tiny" else "paper")
    attn = _load("attention", attn_name, AttentionConfig)
    c = count_parameters(model, attn)
    mask = attn.layer_mask(model.num_layers)
    print(f"model {model.name}  attention {attn_name}  ({sum(mask)}/{model.num_layers} MSA layers, "
          f"{sum(model.moe_layout())} MoE layers)")
    print(f"  total params   {_fmt(c.total):>9}  ({c.total:,})")
    print(f"  active params  {_fmt(c.active):>9}  ({c.active:,}); without embeddings "
          f"{_fmt(c.active - c.embedding)}")
    print(f"  embeddings {_fmt(c.embedding)}  attention {_fmt(c.attention)}  index {_fmt(c.index)}  "
          f"dense FFN {_fmt(c.dense_ffn)}  MoE {_fmt(c.moe_total)} (active {_fmt(c.moe_active)})")
    print(f"  {'seq_len':>9} {'dense-eq FLOP/tok':>18} {'MSA sparse':>12} {'MSA warmup':>12} "
          f"{'speedup':>8} {'attn fwd reduction':>19}")
    for seq in args.seq_len:
        de = flops_breakdown(model, attn, seq, "dense_equivalent")["total"]
        sp = flops_breakdown(model, attn, seq, "sparse")["total"]
        wu = flops_breakdown(model, attn, seq, "dense")["total"]
        print(f"  {seq:>9} {_fmt(de):>18} {_fmt(sp):>12} {_fmt(wu):>12} {de / sp:>7.2f}x "
              f"{attention_reduction(model, attn, seq):>18.2f}x")
    if args.build:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        from msa_train.compat import destroy_parallel, init_parallel
        from msa_train.model.meta import build_on_meta, count_built_parameters

        init_parallel({})
        try:
            built = count_built_parameters(build_on_meta(model, attn), model)
        finally:
            destroy_parallel()
        ok = built["total"] == c.total and built["active"] == c.active
        print(f"  meta build: total {built['total']:,} active {built['active']:,} -> "
              f"{'matches' if ok else 'MISMATCH with'} the analytic count")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
