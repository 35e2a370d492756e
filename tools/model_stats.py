#!/usr/bin/env python
"""Print total / active parameters and per-token training FLOPs of a model config, without weights.

  python tools/model_stats.py msa_109b                     # configs/model/msa_109b.yaml
  python tools/model_stats.py pilot_10b --attention paper --seq-len 32768 131072
  python tools/model_stats.py path/to/model.yaml --build   # also build on the meta device and
                                                           # check the analytic count against it
Counts are analytic (msa_train.model.flops); FLOPs follow docs/MSA.md: dense-equivalent (full
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


# Per-layer shape: what a proxy must keep identical to the model it stands for.
LAYER_FIELDS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "rotary_percent", "rotary_base", "normalization",
                "gated_linear_unit", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
                "moe_router_topk", "moe_router_score_function", "moe_router_load_balancing_type",
                "moe_aux_loss_coeff", "qk_layernorm", "norm_zero_centered", "activation",
                "activation_clamp", "moe_router_enable_expert_bias",
                "moe_router_topk_scaling_factor")


def _default_attention(model_name: str) -> str:
    """The attention config of the same name if there is one (tiny, proxy_109b), else paper."""
    return model_name if (REPO / "configs" / "attention" / f"{model_name}.yaml").exists() else "paper"


def _parent_model(name: str):
    """The model config a model yaml extends through its defaults list, if any."""
    from omegaconf import OmegaConf

    path = Path(name) if Path(name).suffix else REPO / "configs" / "model" / f"{name}.yaml"
    if not path.exists():
        return None
    parents = [d for d in OmegaConf.load(path).get("defaults", []) or [] if d != "_self_"]
    return str(parents[0]) if parents else None


def _report(model, attn, attn_name: str, seq_lens) -> None:
    from msa_train.model.flops import attention_reduction, count_parameters, flops_breakdown

    c = count_parameters(model, attn)
    mask = attn.layer_mask(model.num_layers)
    print(f"model {model.name}  attention {attn_name}  ({sum(mask)}/{model.num_layers} MSA layers, "
          f"{sum(model.moe_layout())} MoE layers, {model.num_moe_experts or 0} experts, vocab "
          f"{model.vocab_size})")
    print(f"  total params   {_fmt(c.total):>9}  ({c.total:,})")
    print(f"  active params  {_fmt(c.active):>9}  ({c.active:,}); without embeddings "
          f"{_fmt(c.active - c.embedding)}")
    print(f"  embeddings {_fmt(c.embedding)}  attention {_fmt(c.attention)}  index {_fmt(c.index)}  "
          f"dense FFN {_fmt(c.dense_ffn)}  MoE {_fmt(c.moe_total)} (active {_fmt(c.moe_active)})")
    print(f"  {'seq_len':>9} {'dense-eq FLOP/tok':>18} {'MSA sparse':>12} {'MSA warmup':>12} "
          f"{'speedup':>8} {'attn fwd reduction':>19}")
    for seq in seq_lens:
        de = flops_breakdown(model, attn, seq, "dense_equivalent")["total"]
        sp = flops_breakdown(model, attn, seq, "sparse")["total"]
        wu = flops_breakdown(model, attn, seq, "dense")["total"]
        print(f"  {seq:>9} {_fmt(de):>18} {_fmt(sp):>12} {_fmt(wu):>12} {de / sp:>7.2f}x "
              f"{attention_reduction(model, attn, seq):>18.2f}x")


def _compare_layers(model, base) -> bool:
    """Print the per-layer fields side by side; True when every one is identical."""
    same = True
    print(f"  {'per-layer shape':<38} {model.name:>12} {base.name:>12}")
    for name in LAYER_FIELDS:
        a, b = getattr(model, name), getattr(base, name)
        same &= a == b
        print(f"  {name:<38} {a!s:>12} {b!s:>12}{'' if a == b else '  DIFFERS'}")
    print(f"  per-layer shapes {'identical' if same else 'DIFFER'}")
    return same


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="configs/model name or a yaml path")
    p.add_argument("--attention", default=None, help="configs/attention name or yaml (default: "
                   "the attention config named like the model if any, else paper)")
    p.add_argument("--seq-len", type=int, nargs="+", default=[4096, 32768, 131072, 1048576])
    p.add_argument("--build", action="store_true", help="also build on the meta device and compare")
    args = p.parse_args(argv)

    from msa_train.model.config import AttentionConfig, ModelConfig
    from msa_train.model.flops import count_parameters

    model = _load("model", args.model, ModelConfig)
    attn_name = args.attention or _default_attention(model.name)
    attn = _load("attention", attn_name, AttentionConfig)
    _report(model, attn, attn_name, args.seq_len)
    parent = _parent_model(args.model)
    if parent is not None:  # a proxy: show the model it stands for, and what it keeps of it
        base = _load("model", parent, ModelConfig)
        base_attn_name = _default_attention(base.name)
        print()
        _report(base, _load("attention", base_attn_name, AttentionConfig), base_attn_name,
                args.seq_len)
        print()
        _compare_layers(model, base)
    if args.build:
        c = count_parameters(model, attn)
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
