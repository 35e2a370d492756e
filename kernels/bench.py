"""MSA kernel benchmark: ``python -m msa_kernels.bench`` (CUDA only; a script, not a test).

For every sequence length and selection pattern it times each op through the public API (medians of
CUDA-event timings after warmup), converts to effective TFLOP/s with MSA_SPEC.md's FLOP formulas
(useful work only: selected, causally visible pairs) and compares with baselines measured in the same
run: dense causal SDPA (cuDNN and flash backends), torch.topk over the block-score matrix, and
FlexAttention with a block-sparse BlockMask at the same budget. Parity of every op against the exact
reference is checked first, in the same run; an op whose check failed gets no speedup reported.

Patterns (topk_idx [Hkv, T, K], block ids local to the sequence, local block in the last valid slot):
  sliding  the K most recent blocks
  random   the local block + K-1 distinct random visible blocks per (group, token)
  mix      local + 2 previous blocks + block 0 + K-4 long-range blocks shared by the group's tokens
           of each 1024-token window (what trained indexers show: diagonal, sink column, stripes)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

PATTERNS = ("sliding", "random", "mix")


# ----------------------------------------------------------------------------- selection patterns

def make_pattern(name: str, seq_len: int, hkv: int, topk: int, block_size: int, device, seed: int = 0,
                 chunk: int = 8192) -> torch.Tensor:
    """int32 [Hkv, T, topk] selection of pattern ``name`` for one sequence of ``seq_len`` tokens."""
    if name not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {name!r}")
    gen = torch.Generator(device=device).manual_seed(seed)
    nb = -(-seq_len // block_size)
    out = torch.empty((hkv, seq_len, topk), dtype=torch.int32, device=device)
    window_blocks = max(1, 1024 // block_size)
    n_windows = -(-nb // window_blocks)
    shared = None
    if name == "mix":
        n_long = max(0, topk - 4)
        w_first = torch.arange(n_windows, device=device) * window_blocks  # first block of each window
        cols = torch.arange(nb, device=device)
        ok = (cols[None, :] >= 1) & (cols[None, :] < w_first[:, None] - 2)  # visible to the whole window
        sc = torch.rand((hkv, n_windows, nb), generator=gen, device=device)
        sc = torch.where(ok[None], sc, torch.full_like(sc, -1.0))
        kk = min(n_long, nb)
        s_val, s_idx = torch.topk(sc, kk, dim=-1) if kk else (sc[..., :0], sc[..., :0].long())
        shared = torch.where(s_val >= 0, s_idx, torch.full_like(s_idx, -1))  # [Hkv, W, n_long]
    for a in range(0, seq_len, chunk):
        b = min(seq_len, a + chunk)
        pos = torch.arange(a, b, device=device)
        own = pos // block_size  # [c]
        if name == "sliding":
            offs = torch.arange(topk - 1, 0, -1, device=device)  # oldest first
            others = own[None, :, None] - offs[None, None, :]
            others = torch.where(others >= 0, others, torch.full_like(others, -1)).expand(hkv, -1, -1)
        elif name == "random":
            sc = torch.rand((hkv, b - a, nb), generator=gen, device=device)
            cols = torch.arange(nb, device=device)
            sc = torch.where(cols[None, None, :] < own[None, :, None], sc, torch.full_like(sc, -1.0))
            kk = min(topk - 1, nb)
            s_val, s_idx = torch.topk(sc, kk, dim=-1)
            others = torch.where(s_val >= 0, s_idx, torch.full_like(s_idx, -1))
        else:
            win = own // window_blocks
            long_ = shared[:, win]  # [Hkv, c, n_long]
            near = torch.stack([torch.zeros_like(own), own - 2, own - 1], dim=-1)  # [c, 3]
            keep = torch.stack([own >= 1, own - 2 >= 1, own - 1 >= 1], dim=-1)  # sink, then distinct neighbours
            near = torch.where(keep, near, torch.full_like(near, -1))
            others = torch.cat([long_, near[None].expand(hkv, -1, -1)], dim=-1)[..., : topk - 1]
        others = others.to(torch.int64)
        # valid ids first (stable), then the local block right after them
        order = torch.sort((others < 0).to(torch.int8), dim=-1, stable=True).indices
        others = torch.gather(others, -1, order)
        n_valid = (others >= 0).sum(-1, keepdim=True)
        sel = torch.full((hkv, b - a, topk), -1, dtype=torch.int64, device=device)
        sel[..., : topk - 1] = others
        sel.scatter_(-1, n_valid, own[None, :, None].expand(hkv, -1, 1))
        out[:, a:b] = sel.to(torch.int32)
    return out


def sparse_pairs(topk_idx: torch.Tensor, block_size: int) -> torch.Tensor:
    """float64 [Hkv, T]: causally visible keys in each (group, token)'s selected blocks (one sequence)."""
    t = topk_idx.shape[1]
    pos = torch.arange(t, device=topk_idx.device)
    own = (pos // block_size)[None, :, None]
    ids = topk_idx.long()
    full = torch.where(ids < own, block_size, (pos % block_size + 1)[None, :, None].expand_as(ids))
    return torch.where(ids >= 0, full, torch.zeros_like(full)).sum(-1).double()


# ----------------------------------------------------------------------------- timing

def time_ms(fn: Callable[[], object], *, budget_ms: float = 300.0, min_reps: int = 3) -> float:
    """Median wall time in ms of ``fn`` on the current stream (CUDA events), after warmup."""
    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    stop.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(stop), 1e-3)
    reps = int(max(min_reps, min(200, budget_ms / est)))
    for _ in range(min(reps, 5) if est < 50 else 1):  # warmup (the first call above compiled)
        fn()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]


@dataclass
class Row:
    seq_len: int
    pattern: str
    op: str
    ms: float
    tflops: Optional[float]
    parity: str = "ok"
    note: str = ""

    def md(self) -> str:
        tf = "-" if self.tflops is None else f"{self.tflops:.0f}"
        return (f"| {self.seq_len // 1024}K | {self.pattern} | {self.op} | {self.ms:.3f} | {tf} | "
                f"{self.parity} | {self.note} |")


@dataclass
class Results:
    card: str
    config: Dict
    rows: List[Row] = field(default_factory=list)
    parity: Dict[str, str] = field(default_factory=dict)
    summary: List[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(row.md(), flush=True)


# ----------------------------------------------------------------------------- ops

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    fin = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), fin) or torch.isnan(a).any():
        return float("inf")
    return float((a[fin] - b[fin]).norm() / b[fin].norm().clamp_min(1e-12))


def check_parity(args, device) -> Dict[str, str]:
    """Every op against the exact reference at one mid-size packed case, in this run."""
    import msa_kernels as mk
    from msa_kernels.attention.naive import sparse_attention_ref
    from msa_kernels.kl.naive import indexer_kl_ref
    from msa_kernels.select.naive import select_blocks_ref

    hq, hkv, d, di, bs, k = args.hq, args.hkv, args.dim, args.index_dim, args.block_size, args.topk
    lens = [3000, args.parity_len - 3000]
    cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32, device=device)
    t = sum(lens)
    lay = mk.make_layout(cu, total_keys=t)
    g = torch.Generator(device=device).manual_seed(1234)
    q, kk, v = (torch.randn((t, h, d), generator=g, device=device, dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    qi = torch.randn((t, hkv, di), generator=g, device=device, dtype=torch.bfloat16)
    ki = torch.randn((t, di), generator=g, device=device, dtype=torch.bfloat16)
    status: Dict[str, str] = {}

    sel = mk.select_blocks(qi, ki, cu, bs, k)
    ref_sel = select_blocks_ref(qi.float(), ki.float(), lay, block_size=bs, topk=k, index_scale=di ** -0.5)
    same = (torch.sort(sel, -1).values == torch.sort(ref_sel, -1).values).all(-1).float().mean().item()
    local_ok = bool(((sel >= 0).sum(-1) == (ref_sel >= 0).sum(-1)).all())
    # bf16 index scores round differently from the fp32 reference: a few near-tie rows may swap a block
    status["select_blocks"] = "ok" if same >= 0.995 and local_ok else f"FAIL ({same:.4f} rows identical)"
    status["select_blocks_detail"] = f"{same:.5f} of (group, token) rows select the same set"

    xs = [x.detach().clone().requires_grad_() for x in (q, kk, v)]
    out, lse = mk.sparse_attention(*xs, sel, cu, bs)
    go = torch.randn(out.shape, generator=g, device=device, dtype=out.dtype)
    out.backward(go)
    rs = [x.detach().float().requires_grad_() for x in (q, kk, v)]
    rout, rlse = sparse_attention_ref(*rs, sel, lay, block_size=bs, scale=d ** -0.5)
    rout.backward(go.float())
    errs = {"out": _rel(out, rout), "lse": _rel(lse, rlse)}
    status["sparse_fwd"] = "ok" if max(errs.values()) < 1.5e-2 else f"FAIL {errs}"
    gerrs = {n: _rel(a.grad, b.grad) for n, a, b in zip(("dq", "dk", "dv"), xs, rs)}
    status["sparse_bwd"] = "ok" if max(gerrs.values()) < 1.5e-2 else f"FAIL {gerrs}"
    status["sparse_detail"] = " ".join(f"{n}={e:.1e}" for n, e in {**errs, **gerrs}.items())

    qi2, ki2 = (x.detach().clone().requires_grad_() for x in (qi, ki))
    kl = mk.indexer_kl(q, kk, lse.detach(), qi2, ki2, sel, cu, bs)
    kl.backward()
    qi3, ki3 = (x.detach().float().requires_grad_() for x in (qi, ki))
    rkl = indexer_kl_ref(q.float(), kk.float(), rlse.detach(), qi3, ki3, sel, lay, block_size=bs, scale=d ** -0.5,
                         index_scale=di ** -0.5)
    rkl.backward()
    kerrs = {"kl": abs(kl.item() - rkl.item()) / max(abs(rkl.item()), 1e-6),
             "dq_idx": _rel(qi2.grad, qi3.grad), "dk_idx": _rel(ki2.grad, ki3.grad)}
    status["indexer_kl"] = "ok" if max(kerrs.values()) < 2e-2 else f"FAIL {kerrs}"
    status["kl_detail"] = " ".join(f"{n}={e:.1e}" for n, e in kerrs.items())

    status.update(_fused_parity(args, device))
    return status


def _fused_parity(args, device) -> Dict[str, str]:
    """sparse_attention_and_kl vs the two references, on a realistic ("mix") selection so that the
    fused node (not its unfused fallback for near-random selections) is what gets checked."""
    import msa_kernels as mk
    from msa_kernels.attention.naive import sparse_attention_ref
    from msa_kernels.kl.naive import indexer_kl_ref

    hq, hkv, d, di, bs, k = args.hq, args.hkv, args.dim, args.index_dim, args.block_size, args.topk
    t = args.parity_len
    cu = torch.tensor([0, t], dtype=torch.int32, device=device)
    lay = mk.make_layout(cu, total_keys=t)
    g = torch.Generator(device=device).manual_seed(4321)
    sel = make_pattern("mix", t, hkv, k, bs, device, seed=11)
    shapes = ((t, hq, d), (t, hkv, d), (t, hkv, d), (t, hkv, di), (t, di))
    xs = [torch.randn(s, generator=g, device=device, dtype=torch.bfloat16).requires_grad_() for s in shapes]
    go = torch.randn(shapes[0], generator=g, device=device, dtype=torch.bfloat16)
    out, lse, kl = mk.sparse_attention_and_kl(xs[0], xs[1], xs[2], sel, xs[3], xs[4], cu, bs)
    node = type(out.grad_fn).__name__
    torch.autograd.backward([out, kl], [go, torch.ones_like(kl)])
    rs = [x.detach().float().requires_grad_() for x in xs]
    rout, rlse = sparse_attention_ref(rs[0], rs[1], rs[2], sel, lay, block_size=bs, scale=d ** -0.5)
    rkl = indexer_kl_ref(rs[0].detach(), rs[1].detach(), rlse.detach(), rs[3], rs[4], sel, lay, block_size=bs,
                         scale=d ** -0.5, index_scale=di ** -0.5)
    torch.autograd.backward([rout, rkl], [go.float(), torch.ones_like(rkl)])
    errs = {"out": _rel(out, rout), "lse": _rel(lse, rlse),
            "kl": abs(kl.item() - rkl.item()) / max(abs(rkl.item()), 1e-6),
            **{n: _rel(a.grad, b.grad) for n, a, b in zip(("dq", "dk", "dv", "dq_idx", "dk_idx"), xs, rs)}}
    right_node = node == "_SparseAttentionKLTritonBackward" or device.type != "cuda"
    return {"fused": "ok" if max(errs.values()) < 2e-2 and right_node else f"FAIL {node} {errs}",
            "fused_detail": f"{node}: " + " ".join(f"{n}={e:.1e}" for n, e in errs.items())}


def bench_length(args, t: int, res: Results, device) -> None:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import msa_kernels as mk

    hq, hkv, d, di, bs, k = args.hq, args.hkv, args.dim, args.index_dim, args.block_size, args.topk
    g = torch.Generator(device=device).manual_seed(t)
    cu = torch.tensor([0, t], dtype=torch.int32, device=device)
    causal_pairs = t * (t + 1) / 2
    dense_fwd = 4 * d * hq * causal_pairs
    par = res.parity

    def ok(op):
        return par.get(op, "not checked")

    # --- dense baselines (pattern independent)
    dense: Dict[str, float] = {}
    qd = torch.randn((1, hq, t, d), generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
    kd = torch.randn((1, hq, t, d), generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
    vd = torch.randn((1, hq, t, d), generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
    god = torch.randn_like(qd)
    budget = args.budget_ms
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                f_ms = time_ms(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True), budget_ms=budget)

                def fb():
                    o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
                    torch.autograd.grad(o, (qd, kd, vd), god)
                fb_ms = time_ms(fb, budget_ms=budget)
        except RuntimeError as e:  # backend unavailable for this shape / build
            res.summary.append(f"{t // 1024}K dense {name}: unavailable ({str(e).splitlines()[0][:80]})")
            continue
        dense[name] = fb_ms
        res.add(Row(t, "dense", f"SDPA {name} fwd", f_ms, dense_fwd / f_ms / 1e9, "-"))
        res.add(Row(t, "dense", f"SDPA {name} fwd+bwd", fb_ms, 3.5 * dense_fwd / fb_ms / 1e9, "-",
                    f"bwd {fb_ms - f_ms:.2f} ms = {2.5 * dense_fwd / (fb_ms - f_ms) / 1e9:.0f} TF/s"))
    del qd, kd, vd, god
    torch.cuda.empty_cache()

    # --- indexer + top-k (pattern independent: the selection comes from the scores)
    qi = torch.randn((t, hkv, di), generator=g, device=device, dtype=torch.bfloat16)
    ki = torch.randn((t, di), generator=g, device=device, dtype=torch.bfloat16)
    sel_ms = time_ms(lambda: mk.select_blocks(qi, ki, cu, bs, k), budget_ms=budget)
    idx_flops = 2 * di * hkv * causal_pairs
    res.add(Row(t, "indexer", "select_blocks (score+blockmax+topk)", sel_ms, idx_flops / sel_ms / 1e9,
                ok("select_blocks")))
    nb = -(-t // bs)
    try:
        scores = torch.randn((t * hkv, nb), generator=g, device=device, dtype=torch.float32)
        topk_ms = time_ms(lambda: torch.topk(scores, k, dim=-1), budget_ms=budget)
        note = (f"select_blocks incl. scores is {topk_ms / sel_ms:.2f}x faster" if ok("select_blocks") == "ok"
                else "select_blocks parity failed: no comparison reported")
        res.add(Row(t, "indexer", f"torch.topk [T*Hkv, T/{bs}] fp32 (top-k only)", topk_ms, None, "-", note))
        del scores
    except torch.cuda.OutOfMemoryError:
        res.summary.append(f"{t // 1024}K torch.topk: OOM for the [T*Hkv, T/{bs}] score matrix")

    q = torch.randn((t, hq, d), generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
    kk = torch.randn((t, hkv, d), generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
    v = torch.randn((t, hkv, d), generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
    qi.requires_grad_()
    ki.requires_grad_()
    go = torch.randn((t, hq, d), generator=g, device=device, dtype=torch.bfloat16)
    for pattern in args.patterns:
        sel = make_pattern(pattern, t, hkv, k, bs, device, seed=t + 7)
        pairs = sparse_pairs(sel, bs)
        sp_fwd = 4 * d * (hq // hkv) * float(pairs.sum())
        kl_flops = 2 * (d * hq + 3 * di * hkv) * float(pairs.mean(0).sum())
        fwd_ms = time_ms(lambda: mk.sparse_attention(q, kk, v, sel, cu, bs), budget_ms=budget)
        out, lse = mk.sparse_attention(q, kk, v, sel, cu, bs)
        bwd_ms = time_ms(lambda: torch.autograd.grad(out, (q, kk, v), go, retain_graph=True), budget_ms=budget)
        det_ms = None
        if args.deterministic:
            out_d, _ = mk.sparse_attention(q, kk, v, sel, cu, bs, deterministic=True)
            det_ms = time_ms(lambda: torch.autograd.grad(out_d, (q, kk, v), go, retain_graph=True), budget_ms=budget)
            del out_d
        lse_d = lse.detach()

        def kl_step():
            loss = mk.indexer_kl(q.detach(), kk.detach(), lse_d, qi, ki, sel, cu, bs)
            torch.autograd.grad(loss, (qi, ki))
        kl_ms = time_ms(kl_step, budget_ms=budget)
        res.add(Row(t, pattern, "sparse fwd", fwd_ms, sp_fwd / fwd_ms / 1e9, ok("sparse_fwd"),
                    f"{float(pairs.mean()):.0f} keys/query"))
        res.add(Row(t, pattern, "sparse bwd", bwd_ms, 2.5 * sp_fwd / bwd_ms / 1e9, ok("sparse_bwd")))
        if det_ms is not None:
            res.add(Row(t, pattern, "sparse bwd (deterministic)", det_ms, 2.5 * sp_fwd / det_ms / 1e9,
                        ok("sparse_bwd")))
        res.add(Row(t, pattern, "indexer_kl fwd+bwd", kl_ms, None if kl_flops == 0 else 3 * kl_flops / kl_ms / 1e9,
                    ok("indexer_kl"), "TF/s counts fwd+bwd as 3x the KL formula"))
        layer_ms = sel_ms + fwd_ms + bwd_ms + kl_ms
        layer_ok = all(ok(o) == "ok" for o in ("select_blocks", "sparse_fwd", "sparse_bwd", "indexer_kl"))
        note = "parity failed: no speedup reported"
        if layer_ok:
            note = ", ".join(f"{dense[n] / layer_ms:.2f}x vs dense {n} fwd+bwd" for n in dense)
        res.add(Row(t, pattern, "MSA layer (select+fwd+bwd+KL)", layer_ms, None,
                    "ok" if layer_ok else "FAIL", note))

        # The same layer with the fused attention + KL node (msa_kernels.sparse_attention_and_kl).
        fused_node = []

        def fused_step():
            o, _, kl = mk.sparse_attention_and_kl(q, kk, v, sel, qi, ki, cu, bs)
            fused_node[:] = [type(o.grad_fn).__name__]
            torch.autograd.backward([o, kl], [go, torch.ones_like(kl)], inputs=[q, kk, v, qi, ki])
        fused_ms = time_ms(fused_step, budget_ms=budget)
        for x in (q, kk, v, qi, ki):
            x.grad = None
        fused_layer = sel_ms + fused_ms
        f_ok = layer_ok and ok("fused") == "ok"
        note = "parity failed: no speedup reported"
        if f_ok:
            note = (", ".join(f"{dense[n] / fused_layer:.2f}x vs dense {n} fwd+bwd" for n in dense)
                    + f"; {layer_ms / fused_layer:.2f}x vs unfused; node {fused_node[0] if fused_node else '?'}")
        res.add(Row(t, pattern, "MSA layer, fused attention+KL (select + fused fwd+bwd)", fused_layer, None,
                    "ok" if f_ok else "FAIL", note))
        if args.flex:
            flex_row(args, t, pattern, sel, res, device, dense)
        del out, lse
        torch.cuda.empty_cache()

    if t >= args.memory_len:
        res.summary.append(memory_probe(args, t, device))


def flex_row(args, t, pattern, sel, res, device, dense) -> None:
    """FlexAttention, block-sparse BlockMask: each 128-query block shares the K blocks its first
    token selected (diagonal block causal), i.e. the same budget without per-token selection."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    hq, hkv, d, bs = args.hq, args.hkv, args.dim, args.block_size
    g = torch.Generator(device=device).manual_seed(3)
    nb = -(-t // bs)
    first = sel[:, ::bs].long()  # [Hkv, QB, K]: selection of each query block's first token
    qb = torch.arange(nb, device=device)
    diag = first == qb[None, :, None]
    full_ids = torch.where((first >= 0) & ~diag, first, torch.full_like(first, nb))
    full_ids = torch.sort(full_ids, -1).values
    n_full = (full_ids < nb).sum(-1)
    full_ids = torch.where(full_ids < nb, full_ids, torch.zeros_like(full_ids))
    # BlockMask index tensors are [B, H, q blocks, kv blocks] (the last dim is the KV block count)
    full_ids = torch.nn.functional.pad(full_ids, (0, max(0, nb - full_ids.shape[-1])))[..., :nb]
    part_ids = torch.zeros_like(full_ids)
    part_ids[..., 0] = qb[None, :]
    n_part = torch.ones_like(n_full)

    def rep(x):  # [Hkv, ...] -> [1, Hq, ...]
        return x.repeat_interleave(hq // hkv, 0)[None].to(torch.int32).contiguous()

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    try:
        mask = BlockMask.from_kv_blocks(rep(n_part), rep(part_ids), rep(n_full), rep(full_ids), BLOCK_SIZE=bs,
                                        mask_mod=causal, seq_lengths=(t, t))
        flex = torch.compile(flex_attention, dynamic=False)
        q = torch.randn((1, hq, t, d), generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
        kk = torch.randn((1, hkv, t, d), generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
        v = torch.randn((1, hkv, t, d), generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
        go = torch.randn_like(q)
        f_ms = time_ms(lambda: flex(q, kk, v, block_mask=mask, enable_gqa=True), budget_ms=args.budget_ms)

        def fb():
            o = flex(q, kk, v, block_mask=mask, enable_gqa=True)
            torch.autograd.grad(o, (q, kk, v), go)
        fb_ms = time_ms(fb, budget_ms=args.budget_ms)
    except Exception as e:  # compile failures must not kill the whole table
        res.summary.append(f"{t // 1024}K flex {pattern}: failed ({type(e).__name__}: {str(e)[:160]})")
        return
    pairs = float(n_full.sum()) * bs * bs * (hq // hkv) + nb * bs * (bs + 1) / 2 * hq  # [all heads]
    fwd_fl = 4 * d * pairs
    res.add(Row(t, pattern, "FlexAttention block-sparse fwd", f_ms, fwd_fl / f_ms / 1e9, "-"))
    note = f"bwd {2.5 * fwd_fl / max(fb_ms - f_ms, 1e-6) / 1e9:.0f} TF/s"
    if "flash" in dense:
        note += f"; fwd+bwd {dense['flash'] / fb_ms:.1f}x vs dense flash"
    res.add(Row(t, pattern, "FlexAttention block-sparse fwd+bwd", fb_ms, 3.5 * fwd_fl / fb_ms / 1e9, "-", note))


def memory_probe(args, t, device) -> str:
    """Peak GPU memory of one MSA layer step (inputs, select, fwd, KL, bwd; no weights)."""
    import msa_kernels as mk

    hq, hkv, d, di, bs, k = args.hq, args.hkv, args.dim, args.index_dim, args.block_size, args.topk
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    g = torch.Generator(device=device).manual_seed(5)
    cu = torch.tensor([0, t], dtype=torch.int32, device=device)
    q = torch.randn((t, hq, d), generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
    kk = torch.randn((t, hkv, d), generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
    v = torch.randn((t, hkv, d), generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
    qi = torch.randn((t, hkv, di), generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
    ki = torch.randn((t, di), generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
    sel = mk.select_blocks(qi.detach(), ki.detach(), cu, bs, k)
    out, lse = mk.sparse_attention(q, kk, v, sel, cu, bs)
    loss = mk.indexer_kl(q.detach(), kk.detach(), lse.detach(), qi, ki, sel, cu, bs)
    torch.autograd.backward([out, loss], [torch.ones_like(out), None])
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    return (f"{t // 1024}K tokens, one MSA layer fwd+bwd (inputs + activations + grads, no weights): "
            f"peak {peak:.2f} GiB")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", default="8192,32768,131072", help="comma-separated sequence lengths")
    p.add_argument("--patterns", default=",".join(PATTERNS))
    p.add_argument("--hq", type=int, default=64)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--index-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--parity-len", type=int, default=8192)
    p.add_argument("--budget-ms", type=float, default=300.0, help="time spent repeating each measurement")
    p.add_argument("--memory-len", type=int, default=131072, help="measure peak memory at lengths >= this")
    p.add_argument("--no-flex", dest="flex", action="store_false")
    p.add_argument("--deterministic", action="store_true", help="also time the deterministic backward")
    p.add_argument("--json", default=None, help="write all rows here")
    args = p.parse_args(argv)
    args.patterns = [x for x in args.patterns.split(",") if x]
    for pat in args.patterns:
        if pat not in PATTERNS:
            p.error(f"--patterns: {pat!r} is not one of {PATTERNS}")
    if not torch.cuda.is_available():
        print("msa_kernels.bench needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    card = torch.cuda.get_device_name(device)
    res = Results(card=card, config={k: v for k, v in vars(args).items() if k != "json"})
    print(f"# MSA kernels on {card} (torch {torch.__version__}); Hq/Hkv {args.hq}/{args.hkv}, d={args.dim}, "
          f"Di={args.index_dim}, block {args.block_size}, top-{args.topk}, bf16", flush=True)
    t0 = time.time()
    res.parity = check_parity(args, device)
    print("parity:", json.dumps(res.parity), flush=True)
    print("| T | pattern | op | ms (median) | eff. TFLOP/s | parity | note |\n|---|---|---|---|---|---|---|",
          flush=True)
    for t in (int(x) for x in args.seqlens.split(",") if x):
        bench_length(args, t, res, device)
        torch.cuda.empty_cache()
    for line in res.summary:
        print("-", line)
    print(f"total {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": res.card, "config": res.config, "parity": res.parity, "summary": res.summary,
                       "rows": [r.__dict__ for r in res.rows]}, f, indent=1)
    return 0 if all(v == "ok" for n, v in res.parity.items() if not n.endswith("detail")) else 1


if __name__ == "__main__":
    sys.exit(main())
