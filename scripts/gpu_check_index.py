"""GPU parity + timing of the Index Branch kernels (select_blocks, indexer_kl, indexer_kl_dense).

One device call: `PYTHONUNBUFFERED=1 python scripts/gpu_check_index.py --out $OUT`. Parity runs against
the float32 PyTorch reference on upcast inputs (bf16 kernels, fp32 accumulation); the timing section
compares select_blocks with torch.topk over the materialized block scores and times the KL ops.
Writes <out>/index_check.log (everything) and <out>/index_results.md (the table for
kernels/BENCHMARKS.md). Exits non-zero if any parity check fails: timings of a failing op are
not reported as results.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

import msa_kernels.layout as layout_mod
from msa_kernels.attention.naive import sparse_attention_ref
from msa_kernels.kl.naive import indexer_kl_dense_ref, indexer_kl_ref
from msa_kernels.kl.triton import indexer_kl_dense_triton, indexer_kl_triton
from msa_kernels.layout import make_layout
from msa_kernels.select.naive import block_scores_ref, select_blocks_ref
from msa_kernels.select.triton import select_blocks_triton
from msa_kernels.tuning import kl_tuning, select_tuning

LOG = []
RESULTS = []
FAILED = []


def log(msg: str) -> None:
    print(msg, flush=True)
    LOG.append(msg)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bench(fn, reps: int = 20) -> float:
    """Median ms over reps, after warm-up, with CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def packed(lens, dev):
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    t = int(cu[-1])
    return cu, make_layout(cu, total_keys=t, total_queries=t), t


def causal_pairs(lens):
    return sum(n * (n + 1) // 2 for n in lens)


def sparse_pairs(topk_idx, lay, bs):
    """Exact (query, key, group) support count / Hkv, i.e. pairs per group averaged."""
    pos = lay.token_positions()  # [T]
    ids = topk_idx.long()
    valid = ids >= 0
    start = ids * bs
    cnt = torch.clamp(torch.minimum(start + bs, pos[None, :, None] + 1) - start, min=0)
    return float((cnt * valid).sum()) / topk_idx.shape[0]


def check_select(t_len, hkv, di, bs, topk, dtype, dev, fs=False, lw=0):
    lens = [t_len] if t_len <= 16384 else [t_len // 2, t_len // 2 - 77, 77]
    cu, lay, t = packed(lens, dev)
    qi = torch.randn(t, hkv, di, device=dev).to(dtype)
    ki = torch.randn(t, di, device=dev).to(dtype)
    out = torch.full((hkv, t, topk), -7, dtype=torch.int32, device=dev)
    out.copy_(select_blocks_triton(qi, ki, lay, block_size=bs, topk=topk, index_scale=di ** -0.5,
                                   force_sink=fs, local_window=lw))
    ref = select_blocks_ref(qi.float(), ki.float(), lay, block_size=bs, topk=topk, index_scale=di ** -0.5,
                            force_sink=fs, local_window=lw)
    exact = bool((out == ref).all())
    # As sets: the local slot must agree exactly; the ranked sets may differ only at near-ties.
    a, _ = out.sort(-1)
    b, _ = ref.sort(-1)
    diff_rows = (a != b).any(-1)
    n_diff = int(diff_rows.sum())
    ok = bool(((out == -7).sum() == 0))
    worst_gap = 0.0
    if n_diff:
        scores = block_scores_ref(qi.float(), ki.float(), lay, block_size=bs, index_scale=di ** -0.5)
        r_idx, t_idx = diff_rows.nonzero(as_tuple=True)
        r_idx, t_idx = r_idx[:4096], t_idx[:4096]
        sa = scores[r_idx, t_idx].gather(-1, out[r_idx, t_idx].clamp_min(0).long())
        sb = scores[r_idx, t_idx].gather(-1, ref[r_idx, t_idx].clamp_min(0).long())
        sa = torch.where(out[r_idx, t_idx] >= 0, sa, torch.zeros_like(sa)).sum(-1)
        sb = torch.where(ref[r_idx, t_idx] >= 0, sb, torch.zeros_like(sb)).sum(-1)
        worst_gap = float((sb - sa).abs().max())  # total selected score lost by the kernel
    ok = ok and worst_gap < 1e-3 and n_diff <= max(8, t * hkv // 1000)
    tag = f"select T={t} Hkv={hkv} Di={di} Bk={bs} k={topk} {str(dtype)[6:]} sink={fs} win={lw}"
    log(f"{'PASS' if ok else 'FAIL'} {tag}: exact={exact} rows_differing={n_diff} max_score_gap={worst_gap:.2e}")
    if not ok:
        FAILED.append(tag)


def kl_inputs(t_len, hq, hkv, d, di, bs, topk, dtype, dev):
    lens = [t_len - 300, 300] if t_len > 600 else [t_len]
    cu, lay, t = packed(lens, dev)
    q = torch.randn(t, hq, d, device=dev).to(dtype)
    k = torch.randn(t, hkv, d, device=dev).to(dtype)
    v = torch.randn(t, hkv, d, device=dev).to(dtype)
    qi = (torch.randn(t, hkv, di, device=dev) * 0.5).to(dtype)
    ki = (torch.randn(t, di, device=dev) * 0.5).to(dtype)
    idx = select_blocks_triton(qi, ki, lay, block_size=bs, topk=topk, index_scale=di ** -0.5)
    _, lse = sparse_attention_ref(q.float(), k.float(), v.float(), idx, lay, block_size=bs, scale=d ** -0.5)
    return lay, q, k, lse.detach(), qi, ki, idx


def check_kl(t_len, hq, hkv, d, di, bs, topk, dtype, dev, dense=False, deterministic=False):
    lay, q, k, lse, qi, ki, idx = kl_inputs(t_len, hq, hkv, d, di, bs, topk, dtype, dev)
    qf, kf = q.float(), k.float()
    qif = qi.float().requires_grad_(True)
    kif = ki.float().requires_grad_(True)
    # fp16 gradients of the MEAN KL are ~1e-8: below fp16's subnormal range, so they flush to zero in
    # any fp16 implementation (the reference's .to(fp16) too). Training scales the loss; here "sum".
    red = "sum" if dtype == torch.float16 else "mean"
    if dense:
        ref = indexer_kl_dense_ref(qf, kf, qif, kif, lay, scale=d ** -0.5, index_scale=di ** -0.5,
                                   reduction=red)
    else:
        ref = indexer_kl_ref(qf, kf, lse, qif, kif, idx, lay, block_size=bs, scale=d ** -0.5,
                             index_scale=di ** -0.5, reduction=red)
    gr = torch.autograd.grad(ref, [qif, kif])
    qi2 = qi.clone().requires_grad_(True)
    ki2 = ki.clone().requires_grad_(True)
    if dense:
        out = indexer_kl_dense_triton(q, k, qi2, ki2, lay, scale=d ** -0.5, index_scale=di ** -0.5,
                                      deterministic=deterministic, reduction=red)
    else:
        out = indexer_kl_triton(q, k, lse, qi2, ki2, idx, lay, block_size=bs, scale=d ** -0.5,
                                index_scale=di ** -0.5, deterministic=deterministic, reduction=red)
    go = torch.autograd.grad(out, [qi2, ki2])
    out, ref = out.detach(), ref.detach()
    e_kl = abs(float(out) - float(ref)) / max(abs(float(ref)), 1e-12)
    e_dq, e_dk = rel(go[0], gr[0]), rel(go[1], gr[1])
    finite = all(bool(torch.isfinite(x).all()) for x in (out, *go))
    ok = finite and e_kl < 2e-2 and e_dq < 2e-2 and e_dk < 2e-2
    tag = (f"{'kl_dense' if dense else 'kl_sparse'} T={lay.total_q} {hq}/{hkv} D={d} Di={di} Bk={bs} "
           f"k={topk} {str(dtype)[6:]} det={deterministic} {red}")
    log(f"{'PASS' if ok else 'FAIL'} {tag}: kl={float(out):.5f} ref={float(ref):.5f} rel_kl={e_kl:.2e} "
        f"rel_dq={e_dq:.2e} rel_dk={e_dk:.2e}")
    if not ok:
        FAILED.append(tag)


def realistic_topk(lay, hkv, bs, topk, dev, seed=0):
    """Local block + block 0 + long-range blocks shared by each 128-query tile and group."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    pos = lay.token_positions().cpu()
    t = pos.numel()
    local = pos // bs
    out = torch.full((hkv, t, topk), -1, dtype=torch.int32)
    tile = torch.arange(t) // 128
    n_tiles = int(tile.max()) + 1
    rnd = torch.rand(hkv, n_tiles, topk - 2, generator=g)
    for r in range(hkv):
        shared = (rnd[r][tile] * local[:, None].clamp_min(1)).long()  # [T, k-2] in [0, local)
        cand = torch.cat([torch.zeros(t, 1, dtype=torch.long), shared], 1)
        cand = torch.where(cand < local[:, None], cand, torch.full_like(cand, -1))
        # Drop duplicates (they would count once anyway) so the slot layout stays canonical.
        srt, _ = cand.sort(-1)
        dup = torch.zeros_like(srt, dtype=torch.bool)
        dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
        srt = torch.where(dup, torch.full_like(srt, -1), srt)
        srt, _ = srt.sort(-1, descending=True)
        n = (srt >= 0).sum(-1)
        row = torch.full((t, topk), -1, dtype=torch.long)
        row[:, : topk - 1] = srt[:, : topk - 1]
        row.scatter_(1, n[:, None].clamp_max(topk - 1), local[:, None])
        out[r] = row.to(torch.int32)
    return out.to(dev)


def sweep_select(t_len, hkv, di, bs, topk, dev):
    """Tile / pipeline variants of the select kernel (the default is the first line)."""
    cu, lay, t = packed([t_len], dev)
    qi = torch.randn(t, hkv, di, device=dev, dtype=torch.bfloat16)
    ki = torch.randn(t, di, device=dev, dtype=torch.bfloat16)
    flops = 2 * di * hkv * causal_pairs([t_len])
    base = select_tuning()
    for cfg in (None, dict(num_stages=3), dict(num_stages=1), dict(block_m=64, num_warps=4),
                dict(block_m=64, num_warps=4, num_stages=3)):
        tuning = dataclasses.replace(base, **(cfg or {}))
        ms = bench(lambda: select_blocks_triton(qi, ki, lay, block_size=bs, topk=topk,
                                                index_scale=di ** -0.5, tuning=tuning))
        log(f"select sweep T={t} Hkv={hkv} cfg={cfg or 'default'}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s")


def _topk_baseline(qi, ki, t, hkv, bs, topk):
    """torch.topk over the materialized [Hkv * T, T / Bk] block scores (bf16 GEMM + masked block max
    + topk), chunked to bound memory at 128K: (topk alone ms, whole pipeline ms)."""
    dev = qi.device
    nb = -(-t // bs)
    scores = torch.empty(hkv, t, nb, device=dev, dtype=torch.float32)
    chunk = 2048
    pos = torch.arange(t, device=dev)

    def materialize():
        for a in range(0, t, chunk):
            s = torch.einsum("chd,jd->hcj", qi[a:a + chunk], ki).float()  # [Hkv, c, T]
            s.masked_fill_(pos[None, :] > pos[a:a + chunk, None], float("-inf"))
            pad = nb * bs - t
            if pad:
                s = torch.nn.functional.pad(s, (0, pad), value=float("-inf"))
            scores[:, a:a + chunk] = s.view(hkv, -1, nb, bs).amax(-1)

    materialize()
    flat = scores.view(hkv * t, nb)
    k_eff = min(topk, nb)
    ms_topk = bench(lambda: torch.topk(flat, k_eff, dim=-1, sorted=False))
    ms_full = bench(lambda: (materialize(), torch.topk(flat, k_eff, dim=-1, sorted=False)), reps=5)
    return ms_topk, ms_full


def time_select(t_len, hkv, di, bs, topk, dev):
    lens = [t_len]
    cu, lay, t = packed(lens, dev)
    qi = torch.randn(t, hkv, di, device=dev, dtype=torch.bfloat16)
    ki = torch.randn(t, di, device=dev, dtype=torch.bfloat16)
    ms = bench(lambda: select_blocks_triton(qi, ki, lay, block_size=bs, topk=topk, index_scale=di ** -0.5))
    flops = 2 * di * hkv * causal_pairs(lens)
    ms_topk, ms_full = _topk_baseline(qi, ki, t, hkv, bs, topk)
    torch.cuda.empty_cache()
    RESULTS.append(
        f"| select_blocks | {t // 1024}K | {hkv} | {di} | {bs} | {topk} | {ms:.3f} | {flops / ms / 1e9:.0f} "
        f"| torch.topk only {ms_topk:.3f} ms; einsum+blockmax+topk {ms_full:.3f} ms | "
        f"{ms_topk / ms:.2f}x / {ms_full / ms:.2f}x |")
    log(RESULTS[-1])


def time_kl(t_len, hq, hkv, d, di, bs, topk, dev, pattern, deterministic=False, tuning=None):
    lens = [t_len]
    cu, lay, t = packed(lens, dev)
    q = torch.randn(t, hq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(t, hkv, d, device=dev, dtype=torch.bfloat16)
    qi = torch.randn(t, hkv, di, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ki = torch.randn(t, di, device=dev, dtype=torch.bfloat16, requires_grad=True)
    lse = torch.randn(t, hq, device=dev) + 8.0
    if pattern == "realistic":
        idx = realistic_topk(lay, hkv, bs, topk, dev)
    else:
        idx = select_blocks_triton(qi.detach(), ki.detach(), lay, block_size=bs, topk=topk,
                                   index_scale=di ** -0.5)
    pairs = sparse_pairs(idx, lay, bs)
    flops = 2 * (d * hq + 3 * di * hkv) * pairs

    def fwd():
        with torch.no_grad():
            return indexer_kl_triton(q, k, lse, qi, ki, idx, lay, block_size=bs, scale=d ** -0.5,
                                     index_scale=di ** -0.5, deterministic=deterministic, tuning=tuning)

    def fwd_bwd():
        out = indexer_kl_triton(q, k, lse, qi, ki, idx, lay, block_size=bs, scale=d ** -0.5,
                                index_scale=di ** -0.5, deterministic=deterministic, tuning=tuning)
        torch.autograd.grad(out, [qi, ki])

    ms_f = bench(fwd, reps=10)
    ms_fb = bench(fwd_bwd, reps=10)
    tag = f"{pattern}, deterministic" if deterministic else pattern
    RESULTS.append(
        f"| indexer_kl ({tag}) | {t // 1024}K | {hq}/{hkv} | {di} | {bs} | {topk} | fwd {ms_f:.2f}, "
        f"fwd+bwd {ms_fb:.2f} | {flops / ms_fb / 1e9:.0f} (fwd+bwd, KL formula) | - | - |")
    log(RESULTS[-1])


def sweep_kl(dev):
    base = kl_tuning()
    for upd in (dict(), dict(qtile_tm=32), dict(union_max_waste=0.0), dict(union_max_waste=0.0, kv_bwd_warps=4)):
        try:
            time_kl(32768, 64, 8, 128, 128, 128, 16, dev, "realistic", tuning=dataclasses.replace(base, **upd))
            log(f"  ^ kl sweep cfg {upd or 'default'}")
        except Exception as e:  # a config that does not compile (shared memory) is skipped
            log(f"kl sweep cfg {upd}: failed {type(e).__name__}: {str(e)[:200]}")


def time_kl_dense(t_len, hq, hkv, d, di, dev):
    lens = [t_len]
    cu, lay, t = packed(lens, dev)
    q = torch.randn(t, hq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(t, hkv, d, device=dev, dtype=torch.bfloat16)
    qi = torch.randn(t, hkv, di, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ki = torch.randn(t, di, device=dev, dtype=torch.bfloat16, requires_grad=True)

    def fwd_bwd():
        out = indexer_kl_dense_triton(q, k, qi, ki, lay, scale=d ** -0.5, index_scale=di ** -0.5)
        torch.autograd.grad(out, [qi, ki])

    ms = bench(fwd_bwd, reps=5)
    flops = 2 * (d * hq + 3 * di * hkv) * causal_pairs(lens)
    RESULTS.append(f"| indexer_kl_dense (lse computed) | {t // 1024}K | {hq}/{hkv} | {di} | - | - | "
                   f"fwd+bwd {ms:.2f} | {flops / ms / 1e9:.0f} | - | - |")
    log(RESULTS[-1])


def profile_kl(dev, t_len=32768, hq=64, hkv=8, bs=128, topk=16):
    """Per-kernel CUDA time of one KL fwd+bwd (atomic mode) and of the schedule build."""
    from torch.profiler import ProfilerActivity, profile

    from msa_kernels.kl import dense, kv_outer, union
    cu, lay, t = packed([t_len], dev)
    q = torch.randn(t, hq, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(t, hkv, 128, device=dev, dtype=torch.bfloat16)
    qi = torch.randn(t, hkv, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ki = torch.randn(t, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    lse = torch.randn(t, hq, device=dev) + 8.0
    idx = realistic_topk(lay, hkv, bs, topk, dev)
    ms_units = bench(lambda: kv_outer.kv_units(idx, lay, bs, kl_tuning().kv_chunk), reps=5)
    log(f"profile: KV schedule build (block_key_rows + build_kv_units + query_key_rows) {ms_units:.2f} ms")

    def step():
        out = indexer_kl_triton(q, k, lse, qi, ki, idx, lay, block_size=bs, scale=128 ** -0.5,
                                index_scale=128 ** -0.5)
        torch.autograd.grad(out, [qi, ki])

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    log(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))
    from msa_kernels.select import triton as selt
    for fn in (kv_outer._kl_kv_student_max_kernel, kv_outer._kl_kv_fwd_kernel, kv_outer._kl_kv_bwd_kernel,
               union._kl_sparse_fwd_kernel, dense._kl_dense_fwd_kernel, dense._kl_dense_dk_kernel,
               selt._select_blocks_kernel):
        for cache in fn.device_caches.values():
            for kern in cache[0].values():
                kern._init_handles()
                log(f"  {fn.__name__}: regs={kern.n_regs} spills={kern.n_spills} "
                    f"smem={kern.metadata.shared} warps={kern.metadata.num_warps}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="no 128K timing")
    ap.add_argument("--sweep", action="store_true", help="also time tile-config variants")
    ap.add_argument("--profile", action="store_true", help="per-kernel CUDA times of the KL")
    ap.add_argument("--skip-parity", action="store_true", help="timing only (never for reported results)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    # The reference chunks to bound memory on CPU; on an 80 GB card bigger chunks are much faster.
    layout_mod.REFERENCE_CHUNK_ELEMENTS = 1 << 28
    torch.manual_seed(0)
    card = torch.cuda.get_device_name()
    log(f"card: {card}; torch {torch.__version__}")
    t0 = time.time()

    log("== parity ==")
    if args.skip_parity:
        FAILED.append("parity skipped: timings below are not results")
    if not args.skip_parity:
        for hkv in (4, 8):
            check_select(8192, hkv, 128, 128, 16, torch.bfloat16, dev)
        check_select(32768, 8, 128, 128, 16, torch.bfloat16, dev)
        check_select(8192, 4, 64, 64, 32, torch.float16, dev, fs=True, lw=2)
        check_select(8192, 8, 128, 128, 1, torch.bfloat16, dev)
        check_select(3000, 2, 128, 64, 7, torch.float32, dev)
        for hq, hkv in ((64, 4), (64, 8)):
            check_kl(8192, hq, hkv, 128, 128, 128, 16, torch.bfloat16, dev)
        check_kl(8192, 64, 8, 128, 128, 128, 16, torch.bfloat16, dev, deterministic=True)
        for det in (False, True):
            check_kl(4096, 32, 4, 64, 64, 64, 8, torch.float16, dev, deterministic=det)
            check_kl(4096, 32, 4, 64, 64, 64, 8, torch.bfloat16, dev, deterministic=det)
            check_kl(4096, 32, 4, 128, 128, 64, 8, torch.float16, dev, deterministic=det)
            check_kl(4096, 32, 4, 64, 64, 64, 8, torch.float32, dev, deterministic=det)
        check_kl(4096, 8, 8, 128, 64, 128, 4, torch.bfloat16, dev)
        check_kl(4096, 64, 8, 128, 128, 128, 16, torch.bfloat16, dev, dense=True)
        check_kl(4096, 16, 2, 64, 64, 128, 16, torch.float16, dev, dense=True, deterministic=True)
    log(f"parity done in {time.time() - t0:.0f}s; failures: {FAILED or 'none'}")

    log("== timing (bf16) ==")
    header = ("| op | T | heads | Di | Bk | k | ms | eff. TFLOP/s | baseline | speedup |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
    for t_len in ((8192, 32768) if args.quick else (8192, 32768, 131072)):
        time_select(t_len, 8, 128, 128, 16, dev)
    time_select(32768, 4, 128, 128, 16, dev)
    if args.sweep:
        sweep_select(32768, 8, 128, 128, 16, dev)
    if args.sweep:
        sweep_kl(dev)
    for pattern in ("realistic", "selected"):
        for det in (False, True):
            time_kl(32768, 64, 8, 128, 128, 128, 16, dev, pattern, deterministic=det)
    time_kl(8192, 64, 8, 128, 128, 128, 16, dev, "realistic")
    time_kl_dense(8192, 64, 8, 128, 128, dev)
    if args.profile:
        profile_kl(dev)
    log(f"total {time.time() - t0:.0f}s")

    with open(os.path.join(args.out, "index_results.md"), "w") as f:
        f.write(f"card: {card}\n\nparity failures: {FAILED or 'none'}\n\n{header}\n" + "\n".join(RESULTS) + "\n")
    with open(os.path.join(args.out, "index_check.log"), "w") as f:
        f.write("\n".join(LOG) + "\n")
    print(header)
    print("\n".join(RESULTS))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
