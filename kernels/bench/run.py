"""The benchmark run: work items in priority order, measured until the time budget is spent."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch

from .selections import Family, causal_pairs, index_vectors, parse_family, union_sizes, union_summary, visible_pairs
from .timing import Budget, time_ms
from .workloads import Pack, cp_share, load_packs

__all__ = ["Shape", "Case", "single_case", "pack_case", "cp_case", "measure", "plan", "main"]


@dataclass(frozen=True)
class Shape:
    hq: int
    hkv: int
    dim: int = 128
    index_dim: int = 128
    block_size: int = 128
    topk: int = 16

    @property
    def group(self) -> int:
        return self.hq // self.hkv

    @property
    def heads(self) -> str:
        return f"{self.hq}/{self.hkv}"


@dataclass
class Case:
    """Where the queries and keys come from: one sequence, a whole pack, or one CP rank's share."""

    name: str
    kind: str  # single | pack | cp
    global_len: int  # tokens of the sequence / pack the index vectors are drawn over
    cu_seqlens: torch.Tensor  # int32 query fragments
    key_starts: Optional[torch.Tensor] = None
    key_lens: Optional[torch.Tensor] = None
    q_rows: Optional[torch.Tensor] = None  # rows of the global sequence the queries are (CP share)
    k_rows: Optional[torch.Tensor] = None

    @property
    def total_q(self) -> int:
        return int(self.cu_seqlens[-1])

    @property
    def total_k(self) -> int:
        return self.total_q if self.k_rows is None else int(self.k_rows.numel())


def single_case(t: int) -> Case:
    name = f"{t // 1024}K" if t % 1024 == 0 else f"{t} tokens"
    return Case(name, "single", t, torch.tensor([0, t], dtype=torch.int32))


def pack_case(pack: Pack) -> Case:
    return Case(f"pack {pack.case_id} ({pack.num_docs} docs, whole)", "pack", pack.total,
                torch.tensor(pack.cu_seqlens, dtype=torch.int32))


def cp_case(pack: Pack, cp: int = 16, chunk: int = 1024) -> Case:
    share = cp_share(pack, cp, chunk)
    return Case(f"pack {pack.case_id} ({pack.num_docs} docs, CP{cp} rank {share.rank})", "cp", pack.total,
                share.cu_seqlens, share.key_starts, share.key_lens, share.q_rows, share.k_rows)


@dataclass
class Row:
    heads: str
    case: str
    family: str
    tokens_q: int
    tokens_k: int
    union_mean: float = 0.0
    union_p90: float = 0.0
    keys_per_query: float = 0.0
    ms: Dict[str, float] = field(default_factory=dict)
    tflops: Dict[str, float] = field(default_factory=dict)
    share: Dict[str, float] = field(default_factory=dict)
    vs: Dict[str, float] = field(default_factory=dict)
    peak_gib: Optional[float] = None
    node: str = ""
    check: Dict[str, float] = field(default_factory=dict)
    note: str = ""


# ----------------------------------------------------------------------------- one measurement

def _kw(case: Case, device) -> dict:
    if case.key_starts is None:
        return {}
    return dict(key_starts=case.key_starts.to(device), key_lens=case.key_lens.to(device))


def measure(shape: Shape, case: Case, family: Family, device, *, budget_ms: float, seed: int = 0,
            flex: str = "", dense: Optional[Dict[str, float]] = None) -> Row:
    """Select + attention + KL + whole layer (select + fused attention/KL, fwd+bwd) on one case.

    flex: "" | "approx" | "approx,exact": FlexAttention baselines (single sequences only)."""
    import msa_kernels as mk

    hq, hkv, d, di, bs, k = shape.hq, shape.hkv, shape.dim, shape.index_dim, shape.block_size, shape.topk
    g = torch.Generator(device=device).manual_seed(seed + 1)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    qg, kg = index_vectors(family, case.global_len, hkv, di, device, seed=seed, dtype=dtype)
    q_idx = qg if case.q_rows is None else qg[case.q_rows.to(device)]
    k_idx = kg if case.k_rows is None else kg[case.k_rows.to(device)]
    del qg, kg
    tq, tk = case.total_q, case.total_k
    cu = case.cu_seqlens.to(device)
    kw = _kw(case, device)
    layout = mk.make_layout(cu, kw.get("key_starts"), kw.get("key_lens"), total_keys=tk, total_queries=tq)

    def rnd(*s):
        return torch.randn(s, generator=g, device=device, dtype=dtype)

    q, kk, v = rnd(tq, hq, d), rnd(tk, hkv, d), rnd(tk, hkv, d)
    go = rnd(tq, hq, d)
    for x in (q, kk, v):
        x.requires_grad_(True)
    qi, ki = q_idx.detach().clone().requires_grad_(True), k_idx.detach().clone().requires_grad_(True)
    row = Row(shape.heads, case.name, family.name, tq, tk)

    def t(fn):
        return time_ms(fn, budget_ms=budget_ms, device=device)

    def select():
        return mk.select_blocks(q_idx, k_idx, cu, bs, k, **kw)

    sel = select()
    row.ms["select"] = t(select)
    us = union_summary(union_sizes(sel, layout, bs, tile=128))
    row.union_mean, row.union_p90 = us["mean"], us["p90"]
    pairs = visible_pairs(sel, layout, bs)
    sum_pairs = float(pairs.sum())
    row.keys_per_query = sum_pairs / max(1, pairs.numel())
    f_select = 2 * di * hkv * causal_pairs(layout)
    f_attn = 4 * d * shape.group * sum_pairs  # forward; fwd+bwd = 3.5x
    f_kl = 3 * 2 * (d * shape.group + 3 * di) * sum_pairs  # fwd+bwd of the KL (teacher + student)

    def attention():
        out, _ = mk.sparse_attention(q, kk, v, sel, cu, bs, **kw)
        torch.autograd.backward(out, go, inputs=[q, kk, v])

    row.ms["attention"] = t(attention)
    with torch.no_grad():
        out_ref, lse = mk.sparse_attention(q, kk, v, sel, cu, bs, **kw)
    lse = lse.detach()

    def kl_step():
        loss = mk.indexer_kl(q.detach(), kk.detach(), lse, qi, ki, sel, cu, bs, **kw)
        torch.autograd.backward(loss, inputs=[qi, ki])

    row.ms["kl"] = t(kl_step)
    node = []

    def layer():
        s = mk.select_blocks(qi.detach(), ki.detach(), cu, bs, k, **kw)
        out, _, kl = mk.sparse_attention_and_kl(q, kk, v, s, qi, ki, cu, bs, **kw)
        node[:] = [type(out.grad_fn).__name__]
        torch.autograd.backward([out, kl], [go, torch.ones_like(kl)], inputs=[q, kk, v, qi, ki])

    row.ms["layer"] = t(layer)
    row.node = node[0] if node else ""
    if torch.device(device).type == "cuda":
        for x in (q, kk, v, qi, ki):
            x.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        layer()
        torch.cuda.synchronize()
        row.peak_gib = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    for x in (q, kk, v, qi, ki):
        x.grad = None

    ms = row.ms
    row.tflops = {"select": f_select / ms["select"] / 1e9, "attention": 3.5 * f_attn / ms["attention"] / 1e9,
                  "kl": f_kl / ms["kl"] / 1e9,
                  "layer": (f_select + 3.5 * f_attn + f_kl) / ms["layer"] / 1e9}
    # Shares of the fused layer: select as measured alone; the KL as what the fused node costs on top
    # of the attention alone (its forward + its share of the shared backward).
    row.share = {"select": ms["select"] / ms["layer"],
                 "kl": max(0.0, ms["layer"] - ms["select"] - ms["attention"]) / ms["layer"]}
    for name, dense_ms in (dense or {}).items():
        row.vs[name] = dense_ms / ms["layer"]
    if flex and case.kind == "single":
        _flex(row, flex, shape, sel, q, kk, v, go, out_ref, budget_ms, device)
    return row


_FLEX = {}


def _flex_fn(device):
    from torch.nn.attention.flex_attention import flex_attention

    if torch.device(device).type != "cuda":
        return flex_attention  # eager (CPU smoke runs)
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def _flex(row: Row, which: str, shape: Shape, sel, q, kk, v, go, out_ref, budget_ms, device) -> None:
    from .flex import approx_block_mask, exact_block_mask

    t = q.shape[0]
    cuda = torch.device(device).type == "cuda"
    fa = _flex_fn(device)
    qf, kf, vf = (x.detach().transpose(0, 1)[None].contiguous().requires_grad_(cuda) for x in (q, kk, v))
    gof = go.transpose(0, 1)[None].contiguous()
    scale = shape.dim ** -0.5
    for kind in [w for w in which.split(",") if w]:
        try:
            if kind == "approx":
                mask, _ = approx_block_mask(sel, t, shape.block_size, shape.group)
                keep = None
            elif kind == "exact":
                mask, keep = exact_block_mask(sel, t, shape.block_size, shape.group)
            else:
                raise ValueError(f"unknown flex baseline {kind!r}")

            def step(mask=mask):
                if not cuda:  # CPU smoke runs: Flex has no CPU backward, time the forward
                    return fa(qf, kf, vf, block_mask=mask, enable_gqa=True, scale=scale)
                o = fa(qf, kf, vf, block_mask=mask, enable_gqa=True, scale=scale)
                torch.autograd.backward(o, gof, inputs=[qf, kf, vf])

            row.ms[f"flex_{kind}"] = time_ms(step, budget_ms=budget_ms, device=device)
            row.vs[f"flex_{kind}_attention"] = row.ms[f"flex_{kind}"] / row.ms["attention"]
            if kind == "exact":
                with torch.no_grad():
                    o = fa(qf, kf, vf, block_mask=mask, enable_gqa=True, scale=scale)[0].transpose(0, 1)
                a, b = o.float(), out_ref.float()
                row.check["flex_exact_rel_err"] = float((a - b).norm() / b.norm().clamp_min(1e-12))
            del keep
        except Exception as e:  # a baseline that fails to compile or runs out of memory is reported
            row.note += f"flex {kind}: {type(e).__name__}: {str(e).splitlines()[0][:120]}; "
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()


def dense_baselines(shape: Shape, case: Case, device, budget_ms: float) -> Dict[str, float]:
    """cuDNN and flash SDPA, dense causal fwd+bwd over every document of the case (one call per
    document, timed together; K/V expanded to Hq heads). Not for CP shares (bottom-right causal)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if torch.device(device).type != "cuda" or case.kind == "cp":
        return {}
    cu = case.cu_seqlens.tolist()
    docs = list(zip(cu, cu[1:]))
    g = torch.Generator(device=device).manual_seed(3)
    out = {}
    qd, kd, vd = (torch.randn((1, shape.hq, case.total_q, shape.dim), generator=g, device=device,
                              dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    god = torch.randn_like(qd)

    def fb():
        for a, b in docs:
            o = F.scaled_dot_product_attention(qd[:, :, a:b], kd[:, :, a:b], vd[:, :, a:b], is_causal=True)
            torch.autograd.backward(o, god[:, :, a:b], inputs=[qd, kd, vd])

    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                out[name] = time_ms(fb, budget_ms=budget_ms, device=device)
        except RuntimeError as e:  # backend unavailable for this shape / build
            print(f"  dense {name} unavailable: {str(e).splitlines()[0][:100]}", flush=True)
        qd.grad = kd.grad = vd.grad = None
    return out


# ----------------------------------------------------------------------------- plan

@dataclass
class Item:
    shape: Shape
    case: Case
    families: List[Family]
    flex: str = ""


def plan(args) -> List[Item]:
    """Work items in priority order (the budget cuts from the end)."""
    shapes = []
    for h in args.heads.split(","):
        hq, hkv = (int(x) for x in h.split("/"))
        shapes.append(Shape(hq, hkv, args.dim, args.index_dim, args.block_size, args.topk))
    families = [parse_family(f) for f in args.families.split(",") if f]
    lens = [int(x) for x in args.seqlens.split(",") if x]
    main_lens = [t for t in lens if t in (32768, 131072)] or lens
    other_lens = [t for t in lens if t not in main_lens]
    flex_kinds = "approx,exact" if args.flex else ""
    items: List[Item] = []
    for i, s in enumerate(shapes):
        for t in main_lens:
            flex = flex_kinds if i == 0 and t <= args.flex_max_len else ""
            items.append(Item(s, single_case(t), families, flex=flex))
    wanted = args.packs.split(",") if args.packs else None
    packs = [p for p in load_packs() if wanted is None or str(p.case_id) in wanted]
    pack_families = [parse_family(f) for f in args.pack_families.split(",") if f]
    for p in packs:
        items.append(Item(shapes[0], cp_case(p), pack_families))
        items.append(Item(shapes[0], pack_case(p), pack_families))
    for s in shapes:
        for t in other_lens:
            items.append(Item(s, single_case(t), families))
    return items


# ----------------------------------------------------------------------------- report

def _f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def markdown(card: str, rows: List[Row], dense: Dict[str, Dict[str, float]], command: str) -> str:
    lines = [f"## {card}", "", f"`{command}`", ""]
    by_key: Dict[tuple, List[Row]] = {}
    for r in rows:
        by_key.setdefault((r.heads, r.case), []).append(r)
    for (heads, case), rs in by_key.items():
        dn = dense.get(f"{heads} {case}", {})
        dense_txt = ", ".join(f"{n} {ms:.1f} ms" for n, ms in dn.items()) or "not measured"
        lines += [f"### {heads} heads, {case} ({rs[0].tokens_q} queries, {rs[0].tokens_k} keys); "
                  f"dense causal SDPA fwd+bwd: {dense_txt}", "",
                  "| selection | union/tile mean (p90) | keys/query | select ms (TF/s) | attention f+b ms (TF/s) "
                  "| KL f+b ms (TF/s) | layer ms (TF/s) | KL % | select % | vs cuDNN | vs flash | Flex approx ms "
                  "| Flex exact ms (rel err) | peak GiB | node |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            m, tf = r.ms, r.tflops
            fe = m.get("flex_exact")
            fe_txt = "-" if fe is None else f"{fe:.1f} ({r.check.get('flex_exact_rel_err', float('nan')):.1e})"
            lines.append(
                f"| {r.family} | {r.union_mean:.1f} ({r.union_p90:.0f}) | {r.keys_per_query:.0f} "
                f"| {m['select']:.2f} ({tf['select']:.0f}) | {m['attention']:.2f} ({tf['attention']:.0f}) "
                f"| {m['kl']:.2f} ({tf['kl']:.0f}) | {m['layer']:.2f} ({tf['layer']:.0f}) "
                f"| {100 * r.share['kl']:.0f} | {100 * r.share['select']:.0f} "
                f"| {_f(r.vs.get('cudnn'), '{:.2f}x')} | {_f(r.vs.get('flash'), '{:.2f}x')} "
                f"| {_f(m.get('flex_approx'), '{:.2f}')} | {fe_txt} | {_f(r.peak_gib, '{:.2f}')} | {r.node} |"
                + (f" {r.note}" if r.note else ""))
        lines.append("")
    return "\n".join(lines)


def targets(rows: List[Row]) -> List[dict]:
    """The layer targets, evaluated on the measured rows (single sequences at 32K / 128K):
    layer >= 3x / 10x dense cuDNN on structured and recorded selections, >= 2.2x / 8x on random;
    attention faster than Flex computing the same op and within 1.3x of Flex's query-tile
    approximation; KL <= 25% and select <= 10% of the layer; 128K layer peak <= 20 GiB at 64/4."""
    out = []
    for r in rows:
        t = {"32K": 32768, "128K": 131072}.get(r.case)
        if t is None:
            continue
        kind = r.family.split(":")[0]
        need = {"random": (2.2, 8.0)}.get(kind, (3.0, 10.0))[0 if t == 32768 else 1]
        where = f"{r.heads} {r.case} {r.family}"

        def add(name, value, goal, ok, where=where):
            out.append({"where": where, "target": name, "measured": value, "goal": goal, "met": bool(ok)})

        if "cudnn" in r.vs:
            add("layer vs dense cuDNN", f"{r.vs['cudnn']:.2f}x", f">= {need:g}x", r.vs["cudnn"] >= need)
        if "flex_exact" in r.ms:
            add("attention vs Flex, same exact op", f"{r.ms['attention']:.1f} vs {r.ms['flex_exact']:.1f} ms",
                "faster", r.ms["attention"] < r.ms["flex_exact"])
        if "flex_approx" in r.ms:
            ratio = r.ms["attention"] / r.ms["flex_approx"]
            add("attention vs Flex, same budget", f"{ratio:.2f}x its time", "<= 1.3x", ratio <= 1.3)
        add("KL share of the layer", f"{100 * r.share['kl']:.0f}%", "<= 25%", r.share["kl"] <= 0.25)
        add("select share of the layer", f"{100 * r.share['select']:.0f}%", "<= 10%", r.share["select"] <= 0.10)
        if t == 131072 and r.heads == "64/4" and r.peak_gib is not None:
            add("layer peak memory", f"{r.peak_gib:.1f} GiB", "<= 20 GiB", r.peak_gib <= 20.0)
    return out


def targets_markdown(items: List[dict]) -> str:
    if not items:
        return ""
    lines = ["### Targets", "", "| where | target | measured | goal | met |", "|---|---|---|---|---|"]
    lines += [f"| {i['where']} | {i['target']} | {i['measured']} | {i['goal']} | {'yes' if i['met'] else 'NO'} |"
              for i in items]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main

def _write(out_dir: str, result: dict, rows: List[Row], card: str, command: str, budget: Budget) -> str:
    result["elapsed_s"] = budget.elapsed()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    result["targets"] = targets(rows)
    md = markdown(card, rows, result["dense"], command)
    md = f"Parity (same run): {json.dumps(result['parity'])}\n\n" + md + "\n" + targets_markdown(result["targets"])
    if result["skipped"]:
        md += "\nSkipped (time budget or memory): " + "; ".join(result["skipped"]) + "\n"
    if result["errors"]:
        md += "\nFAILED: " + "; ".join(result["errors"]) + "\n"
    with open(os.path.join(out_dir, "bench.md"), "w") as f:
        f.write(md)
    return md



def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m msa_kernels.bench", description=sys.modules[__package__].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", default="64/4,64/8", help="Hq/Hkv list, first = headline (default 64/4,64/8)")
    p.add_argument("--seqlens", default="32768,131072,8192,262144")
    p.add_argument("--families", default="random,smooth:256:0.5,recorded",
                   help="selection families: random, smooth:WINDOW:NOISE, recorded[:PATH]")
    p.add_argument("--pack-families", default="smooth:256:0.5")
    p.add_argument("--packs", default="", help="pack case ids to run (default: all kept packs; 'none': no packs)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--index-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--no-flex", dest="flex", action="store_false")
    p.add_argument("--flex-max-len", type=int, default=131072)
    p.add_argument("--budget-s", type=float, default=480.0, help="stop starting new work after this many seconds")
    p.add_argument("--budget-ms", type=float, default=150.0, help="time spent repeating each measurement")
    p.add_argument("--quick", action="store_true",
                   help="64/4 at 32K and 128K, random + smooth, two packs, ~3 minutes")
    p.add_argument("--out", default=".", help="directory for bench.json and bench.md")
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-parity", dest="parity", action="store_false")
    args = p.parse_args(argv)
    if args.quick:
        args.heads, args.seqlens = "64/4", "32768,131072"
        args.families, args.packs = "random,smooth:256:0.5", "0,12"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("msa_kernels.bench needs a CUDA GPU (or --device cpu for a smoke run)", file=sys.stderr)
        return 2
    items = plan(args)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    command = "python -m msa_kernels.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# MSA kernels on {card} (torch {torch.__version__}); {len(items)} work items, "
          f"budget {args.budget_s:.0f} s", flush=True)
    budget = Budget(args.budget_s)
    result = {"card": card, "torch": torch.__version__, "command": command, "args": vars(args),
              "parity": {}, "rows": [], "dense": {}, "skipped": [], "errors": []}
    if args.parity:
        from .parity import check_parity
        head = Shape(*(int(x) for x in args.heads.split(",")[0].split("/")), args.dim, args.index_dim,
                     args.block_size, args.topk)
        result["parity"] = check_parity(head, device)
        print("parity:", json.dumps(result["parity"]), flush=True)
    rows: List[Row] = []
    for it in items:
        label = f"{it.shape.heads} {it.case.name}" + (f" flex {it.flex}" if it.flex else "")
        if budget.spent():
            result["skipped"].append(label)
            print(f"skip (budget): {label}", flush=True)
            continue
        key = f"{it.shape.heads} {it.case.name}"
        t0 = time.time()
        try:
            if key not in result["dense"]:
                result["dense"][key] = dense_baselines(it.shape, it.case, device, args.budget_ms)
            for fam in it.families:
                if budget.spent():
                    result["skipped"].append(f"{label} {fam.name}")
                    continue
                try:
                    row = measure(it.shape, it.case, fam, device, budget_ms=args.budget_ms, flex=it.flex,
                                  dense=result["dense"].get(key))
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception as e:  # one failing case must not cost the rest of the run: report it
                    traceback.print_exc()
                    result["errors"].append(f"{label} {fam.name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    continue
                rows.append(row)
                result["rows"].append(asdict(row))
                print(json.dumps(asdict(row)), flush=True)
        except torch.cuda.OutOfMemoryError as e:
            result["skipped"].append(f"{label}: out of memory ({str(e).splitlines()[0][:80]})")
            print(f"OOM: {label}", flush=True)
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"  {label}: {time.time() - t0:.0f} s (total {budget.elapsed():.0f} s)", flush=True)
        _write(args.out, result, rows, card, command, budget)  # a run cut short keeps what it measured
    md = _write(args.out, result, rows, card, command, budget)
    print(md)
    ok = all(v == "ok" for n, v in result["parity"].items() if not n.endswith("detail"))
    return 0 if ok and not result["errors"] else 1
