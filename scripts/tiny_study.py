#!/usr/bin/env python3
"""Tiny-scale science check of the MSA indexer (docs/TINY_SCALE_STUDY.md reproduces from this).

    python scripts/tiny_study.py --workdir /tmp/tiny_study            # everything (~10 min, 2 cores)
    python scripts/tiny_study.py --workdir /tmp/tiny_study --only unit  # kernel-level part only

Parts (results land in WORKDIR/results.json, curves in WORKDIR/tiny_study.png):
  unit     msa_kernels only: Adam on W_qi / W_ki against a fixed, peaked, exactly learnable teacher
           (dense warmup KL and sparse KL on the selected support); the KL must fall > 10x.
  train    the real trainer (`msa-train`, tiny_cpu): the default 20 warmup + 40 sparse steps, then
           indexer-only continuations from its last checkpoint (content-only index branch, and the
           same with attention.index_rope=true).
  analyze  each checkpoint on held-out validation sequences, per MSA layer: the KL the trainer
           optimizes (dense and sparse support) against the KL of a uniform student on the same
           support, its split into block-level and within-block parts (only the block-level part
           matters for selection), the teacher's locality, block / score recall against random and
           oracle selections, and the best KL an index branch can reach on that backbone
           (W_qi / W_ki fitted offline), with and without index RoPE.
Every KL here is msa_kernels' (the ops the model trains with) or an explicit full-matrix float64
computation; the two are cross-checked on every layer.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

# ----------------------------------------------------------------------------------------- unit


def unit_curves(steps: int = 300, seed: int = 0) -> dict[str, list[float]]:
    """KL curves of W_qi / W_ki trained alone with Adam against a fixed teacher, via msa_kernels.

    Teacher group r: logits alpha * <x Wq_r, x Wk_r> / sqrt(D), identical for the G heads of the
    group, so an index branch with Di = Hkv * D represents it exactly (optimum KL = 0).
    """
    import msa_kernels

    t_seq, n_seq, hidden, hq, hkv, d, di, block, topk, alpha = 64, 2, 32, 4, 2, 8, 16, 8, 3, 3.0
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_seq * t_seq, hidden, generator=gen)  # [T, h] packed
    wq = torch.randn(hidden, hkv * d, generator=gen) / math.sqrt(hidden)
    wk = torch.randn(hidden, hkv * d, generator=gen) / math.sqrt(hidden)
    q = (x @ wq).view(-1, hkv, d).repeat_interleave(hq // hkv, dim=1) * alpha  # [T, Hq, D]
    k = (x @ wk).view(-1, hkv, d)  # [T, Hkv, D]
    v = torch.randn(k.shape, generator=gen)
    cu = torch.arange(0, (n_seq + 1) * t_seq, t_seq, dtype=torch.int32)
    curves = {}
    for mode in ("dense", "sparse"):
        torch.manual_seed(seed)
        w_qi = (torch.randn(hkv * di, hidden) * 0.02).requires_grad_()
        w_ki = (torch.randn(di, hidden) * 0.02).requires_grad_()
        opt = torch.optim.Adam([w_qi, w_ki], lr=1e-2)
        curve = []
        for _ in range(steps + 1):
            q_idx = (x @ w_qi.t()).view(-1, hkv, di)
            k_idx = x @ w_ki.t()
            if mode == "dense":
                kl = msa_kernels.indexer_kl_dense(q, k, q_idx, k_idx, cu)
            else:
                with torch.no_grad():
                    sel = msa_kernels.select_blocks(q_idx, k_idx, cu, block, topk)
                    _, lse = msa_kernels.sparse_attention(q, k, v, sel, cu, block)
                kl = msa_kernels.indexer_kl(q, k, lse, q_idx, k_idx, sel, cu, block)
            curve.append(float(kl.detach()))
            opt.zero_grad()
            kl.backward()
            opt.step()
        curves[mode] = curve
    return curves


# ---------------------------------------------------------------------------------------- train


def run_trainer(workdir: str, name: str, overrides: list[str], log_every: int = 20) -> str:
    """One `msa-train` run in WORKDIR/NAME (its own cwd); returns its metrics.jsonl path."""
    run_dir = os.path.join(workdir, name)
    metrics = os.path.join(run_dir, "runs", name, "metrics.jsonl")
    if os.path.isfile(metrics) and os.path.isfile(os.path.join(run_dir, "done")):
        print(f"[train] {name}: reusing {metrics}", flush=True)
        return metrics
    os.makedirs(run_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "msa_train.train", f"name={name}",
           f"checkpoint.save={os.path.join(run_dir, 'ckpt')}", "logging.plot_at_end=false",
           *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    print(f"[train] {name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    with open(os.path.join(run_dir, "log.txt"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=run_dir, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        for i, line in enumerate(proc.stdout):
            log.write(line)
            if line.startswith("[") and ("step" in line) and i % log_every == 0:
                print(f"  {line.rstrip()}", flush=True)
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"msa-train {name} failed (exit {code}); see {run_dir}/log.txt")
    open(os.path.join(run_dir, "done"), "w").close()
    print(f"[train] {name}: done in {time.time() - t0:.0f}s", flush=True)
    return metrics


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# -------------------------------------------------------------------------------------- analyze


def load_checkpoint_model(iter_dir: str, index_rope: bool | None = None):
    """(model, run config) rebuilt from the checkpoint's run_config.yaml, weights loaded, eval mode.
    Needs init_parallel() first."""
    from omegaconf import OmegaConf

    from msa_train.config.store import MSATrainConfig
    from msa_train.data import build_tokenizer, padded_vocab_size
    from msa_train.model import build_model, build_transformer_config
    from msa_train.trainer.ckpt_layout import RUN_CONFIG_FILENAME
    from msa_train.trainer.init_from import load_weights
    from msa_train.trainer.setup import index_param_predicate

    cfg = OmegaConf.merge(OmegaConf.structured(MSATrainConfig),
                          OmegaConf.load(os.path.join(iter_dir, RUN_CONFIG_FILENAME)))
    if index_rope is not None:
        cfg.attention.index_rope = index_rope
    tok = build_tokenizer(cfg.data.tokenizer)
    vocab = padded_vocab_size(tok.vocab_size, int(cfg.data.tokenizer.make_vocab_size_divisible_by),
                              int(cfg.parallel.tp))
    config = build_transformer_config(OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.attention),
                                      {}, torch.float32)
    model = build_model(config, vocab_size=vocab, max_seq_len=int(cfg.train.seq_length))
    report = load_weights(iter_dir, [model], index_param_predicate([model]), field_name="checkpoint")
    if report.added:
        raise RuntimeError(f"{iter_dir} lacks index weights {report.added}")
    model.eval()
    return model, cfg


def validation_batches(cfg, num_batches: int, batch_size: int) -> list[torch.Tensor]:
    """Held-out token batches [b, s] from the run's validation split (never trained on)."""
    from msa_train.data import build_datasets, build_tokenizer

    tok = build_tokenizer(cfg.data.tokenizer)
    seq = int(cfg.train.seq_length)
    _, valid, _ = build_datasets(cfg.data, tok, seq, int(cfg.train.seed), batch_size,
                                 num_batches * batch_size)
    if valid is None:
        raise RuntimeError("the run's data config has no validation split")
    samples = [torch.as_tensor(valid[i]["tokens"]) for i in range(num_batches * batch_size)]
    return [torch.stack(samples[i * batch_size:(i + 1) * batch_size]) for i in range(num_batches)]


def capture_layers(model, tokens: torch.Tensor) -> dict[int, dict]:
    """Forward one batch; per MSA layer (1-based number): the main-branch q, k (packed, after
    RoPE), the index-branch input x [s, b, h] and the index weights, exactly as the layer saw them."""
    from msa_train.model import MSACoreAttention

    captured: dict[int, dict] = {}
    originals = []
    for module in model.modules():
        if isinstance(module, MSACoreAttention) and module.is_msa:
            original = module._msa_forward

            def wrapped(q, k, v, x, layout, _m=module, _orig=original):
                captured[_m.layer_number] = {
                    "q": q.detach().clone(), "k": k.detach().clone(), "x": x.detach().clone(), "layout": layout,
                    "scale": _m.softmax_scale, "indexer": _m.indexer, "core": _m}
                return _orig(q, k, v, x, layout)

            module._msa_forward = wrapped
            originals.append(module)
    try:
        with torch.no_grad():
            pos = torch.arange(tokens.shape[1])[None].expand_as(tokens)
            model(tokens, pos, None)
    finally:
        for module in originals:
            del module._msa_forward  # back to the class method
    return captured


def _full_matrices(q, k, q_idx, k_idx, seq: int, scale: float, index_scale: float):
    """Per sequence, float64: teacher P [n, Hkv, s, s] (group mean of causal softmax) and student
    log-softmax logits [n, Hkv, s, s] over the full causal context (the warmup support)."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    n = t // seq
    qq = q.double().view(n, seq, hkv, g, d)
    kk = k.double().view(n, seq, hkv, d)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    logits = torch.einsum("nirgd,njrd->nrgij", qq, kk) * scale
    p = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1).mean(2)  # [n, Hkv, s, s]
    s_idx = torch.einsum("nird,njd->nrij", q_idx.double().view(n, seq, hkv, -1),
                         k_idx.double().view(n, seq, -1)) * index_scale
    s_idx = s_idx.masked_fill(~causal, float("-inf"))
    return p, s_idx, causal


def _kl(p, log_q, mask):
    terms = torch.xlogy(p, p) - p * torch.where(mask, log_q, torch.zeros((), dtype=log_q.dtype))
    return torch.where(mask, terms, torch.zeros((), dtype=terms.dtype)).sum(-1)


def kl_decomposition(p, s_idx, causal, block: int) -> dict[str, float]:
    """Dense-support KL(P||Q) = block-level KL(P_B||Q_B) + E_{b~P_B} KL(P(.|b)||Q(.|b)); plus the
    KL of a uniform student on the same support (the no-information baseline)."""
    seq = p.shape[-1]
    log_q = torch.log_softmax(s_idx, -1)
    total = _kl(p, log_q, causal).mean()
    nb = seq // block
    pb = p.view(*p.shape[:-1], nb, block).sum(-1)  # [n, Hkv, s, nb]
    qb = log_q.exp().view(*p.shape[:-1], nb, block).sum(-1)
    vis_b = pb > 0
    block_kl = (torch.xlogy(pb, pb) - pb * torch.log(qb.clamp_min(1e-300))).where(vis_b, torch.zeros(()))
    n_vis = causal.sum(-1).double()  # [s]
    uniform = (n_vis.log() + (torch.xlogy(p, p)).sum(-1)).mean()  # log|S| - H(P)
    block_uniform_q = torch.zeros_like(pb)  # uniform student's block marginals: block sizes / |S|
    sizes = causal.view(seq, nb, block).sum(-1).double()  # [s, nb] visible tokens per block
    block_uniform_q = sizes / n_vis[:, None]
    block_kl_uniform = (torch.xlogy(pb, pb) - pb * torch.log(block_uniform_q.clamp_min(1e-300))
                        ).where(vis_b, torch.zeros(())).sum(-1).mean()
    block_kl = block_kl.sum(-1).mean()
    return {"kl_dense": float(total), "kl_dense_uniform": float(uniform),
            "kl_block": float(block_kl), "kl_block_uniform": float(block_kl_uniform),
            "kl_within": float(total - block_kl)}


def locality(p: torch.Tensor, window: int = 4) -> float:
    """Teacher mass on the query's own and previous window-1 tokens (positional, content-free)."""
    seq = p.shape[-1]
    i = torch.arange(seq)
    near = (i[:, None] - i[None, :] >= 0) & (i[:, None] - i[None, :] < window)
    return float((p * near).sum(-1).mean())


def recall_table(q, k, topk_idx, layout, block: int, topk: int, scale: float, gen) -> dict[str, float]:
    """block / score recall of the indexer's selection, of a random selection (local block +
    random others) and of the main branch's own top-k (score recall's ceiling)."""
    from msa_train.model import compute_recall

    sums = compute_recall(q, k, topk_idx, layout, block, scale)
    rand = random_selection(topk_idx, layout, block, gen)
    rsums = compute_recall(q, k, rand, layout, block, scale)
    oracle = oracle_selection(q, k, layout, block, topk, scale)
    osums = compute_recall(q, k, oracle, layout, block, scale)
    return {"block_recall": float(sums[0] / sums[2]), "score_recall": float(sums[1] / sums[2]),
            "block_recall_random": float(rsums[0] / rsums[2]),
            "score_recall_random": float(rsums[1] / rsums[2]),
            "score_recall_oracle": float(osums[1] / osums[2])}


def random_selection(topk_idx, layout, block: int, gen) -> torch.Tensor:
    """Same shape and valid counts as topk_idx: local block + uniformly random other visible blocks."""
    hkv, t, topk = topk_idx.shape
    pos = layout.q_positions
    out = torch.full_like(topk_idx, -1)
    for i in range(t):
        local = int(pos[i]) // block
        for r in range(hkv):
            others = torch.randperm(local, generator=gen)[: topk - 1] if local else torch.empty(0, dtype=torch.long)
            ids = torch.cat([others, torch.tensor([local])])
            out[r, i, : len(ids)] = ids.to(out.dtype)
    return out


def oracle_selection(q, k, layout, block: int, topk: int, scale: float) -> torch.Tensor:
    """Per (query, group): the local block + the k-1 other blocks with the most group-mean
    attention mass (the selection that maximizes score recall under the local-block rule)."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    out = torch.full((hkv, t, topk), -1, dtype=torch.int32)
    for q_start, q_len, k_start, k_len in layout.fragments:
        qq = q[q_start:q_start + q_len].double().view(q_len, hkv, hq // hkv, d)
        kk = k[k_start:k_start + k_len].double()
        causal = torch.ones(q_len, k_len, dtype=torch.bool).tril()
        p = torch.softmax((torch.einsum("irgd,jrd->rgij", qq, kk) * scale).masked_fill(~causal, float("-inf")),
                          -1).mean(1)  # [Hkv, s, s]
        nb = -(-k_len // block)
        mass = torch.nn.functional.pad(p, (0, nb * block - k_len)).view(hkv, q_len, nb, block).sum(-1)
        local = torch.arange(q_len) // block
        ids = torch.arange(nb)
        mass = mass.masked_fill(ids[None, None] > local[None, :, None], -1.0)
        mass = mass.masked_fill(ids[None, None] == local[None, :, None], float("inf"))
        top = mass.topk(min(topk, nb), -1)
        chosen = torch.where(top.values >= 0, top.indices, torch.full_like(top.indices, -1))
        out[:, q_start:q_start + q_len, : chosen.shape[-1]] = chosen.to(torch.int32)
    return out


def index_tensors(x, w_qi, w_ki, hkv: int, rope_dim: int, positions, rope_base: float):
    """Packed q_idx [T, Hkv, Di], k_idx [T, Di] from the layer input x [s, b, h]."""
    from msa_train.model.indexer import apply_index_rope

    s, b, h = x.shape
    xp = x.transpose(0, 1).reshape(b * s, h)
    q_idx = (xp @ w_qi.t()).view(b * s, hkv, -1)
    k_idx = xp @ w_ki.t()
    if rope_dim:
        q_idx = apply_index_rope(q_idx, positions, rope_dim, rope_base)
        k_idx = apply_index_rope(k_idx, positions, rope_dim, rope_base)
    return q_idx, k_idx


def layer_report(cap: dict, cfg, gen, rope_dim: int = 0) -> dict[str, float]:
    import msa_kernels

    block, topk = int(cfg.attention.block_size), int(cfg.attention.topk)
    q, k, x, layout = cap["q"], cap["k"], cap["x"], cap["layout"]
    ix = cap["indexer"]
    hkv = k.shape[1]
    seq = int(cfg.train.seq_length)
    w_qi, w_ki = ix.linear_qi.weight.detach(), ix.weight_ki.detach()
    q_idx, k_idx = index_tensors(x, w_qi, w_ki, hkv, ix.rope_dim, layout.q_positions, ix.rope_base)
    di = q_idx.shape[-1]
    cu = layout.cu_seqlens
    with torch.no_grad():
        kl_dense_kernel = float(msa_kernels.indexer_kl_dense(q, k, q_idx, k_idx, cu, scale=cap["scale"]))
        sel = msa_kernels.select_blocks(q_idx, k_idx, cu, block, topk)
        v = torch.zeros_like(k)
        _, lse = msa_kernels.sparse_attention(q, k, v, sel, cu, block, scale=cap["scale"])
        kl_sparse = float(msa_kernels.indexer_kl(q, k, lse, q_idx, k_idx, sel, cu, block, scale=cap["scale"]))
        uni = torch.zeros_like(q_idx)
        kl_sparse_uniform = float(msa_kernels.indexer_kl(q, k, lse, uni, k_idx, sel, cu, block,
                                                         scale=cap["scale"]))
    p, s_idx, causal = _full_matrices(q, k, q_idx, k_idx, seq, cap["scale"], di ** -0.5)
    out = kl_decomposition(p, s_idx, causal, block)
    if abs(out["kl_dense"] - kl_dense_kernel) > 1e-4 * max(1.0, kl_dense_kernel):
        raise AssertionError(f"full-matrix KL {out['kl_dense']} != msa_kernels {kl_dense_kernel}")
    out.update(kl_sparse=kl_sparse, kl_sparse_uniform=kl_sparse_uniform, teacher_local4=locality(p),
               teacher_entropy=float(-(torch.xlogy(p, p)).sum(-1).mean()))
    out.update(recall_table(q, k, sel, layout, block, topk, cap["scale"], gen))
    return out


def fit_indexer(train_caps: list[dict], test_caps: list[dict], cfg, rope: bool, steps: int,
                index_dim: int | None = None, lr: float = 1e-2) -> dict[str, float]:
    """Best dense KL an index branch reaches on a FROZEN backbone: W_qi / W_ki fitted offline with
    Adam on the captured inputs / teachers of train_caps, evaluated on test_caps (held out)."""
    ix = train_caps[0]["indexer"]
    hkv = train_caps[0]["k"].shape[1]
    seq = int(cfg.train.seq_length)
    di = index_dim or ix.index_dim
    rope_dim = (int(di * float(cfg.model.rotary_percent)) // 2 * 2) if rope else 0
    base = float(cfg.model.rotary_base)
    w_qi0, w_ki0 = ix.linear_qi.weight.detach(), ix.weight_ki.detach()
    if di == w_ki0.shape[0]:
        w_qi, w_ki = w_qi0.clone(), w_ki0.clone()  # warm start: the trained index branch
    else:
        gen = torch.Generator().manual_seed(0)
        w_qi = torch.randn(hkv * di, w_qi0.shape[1], generator=gen) * 0.02
        w_ki = torch.randn(di, w_ki0.shape[1], generator=gen) * 0.02
    w_qi.requires_grad_()
    w_ki.requires_grad_()
    teachers = [_teacher(c, seq) for c in train_caps]
    opt = torch.optim.Adam([w_qi, w_ki], lr=lr)

    def kl_of(cap, p, causal):
        q_idx, k_idx = index_tensors(cap["x"], w_qi, w_ki, hkv, rope_dim, cap["layout"].q_positions, base)
        n = q_idx.shape[0] // seq
        s_idx = torch.einsum("nird,njd->nrij", q_idx.view(n, seq, hkv, -1), k_idx.view(n, seq, -1)) * di ** -0.5
        log_q = torch.log_softmax(s_idx.masked_fill(~causal, float("-inf")), -1)
        return _kl(p, log_q, causal).mean()

    for step in range(steps):
        opt.zero_grad()
        loss = sum(kl_of(c, p, m) for c, (p, m) in zip(train_caps, teachers)) / len(train_caps)
        loss.backward()
        opt.step()
    with torch.no_grad():
        train_kl = float(sum(kl_of(c, p, m) for c, (p, m) in zip(train_caps, teachers)) / len(train_caps))
        test_teachers = [_teacher(c, seq) for c in test_caps]
        test_kl = float(sum(kl_of(c, p, m) for c, (p, m) in zip(test_caps, test_teachers)) / len(test_caps))
    return {"fit_train_kl": train_kl, "fit_test_kl": test_kl}


def _teacher(cap, seq):
    q, k = cap["q"], cap["k"]
    t, hq, d = q.shape
    hkv = k.shape[1]
    n = t // seq
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    logits = torch.einsum("nirgd,njrd->nrgij", q.float().view(n, seq, hkv, hq // hkv, d),
                          k.float().view(n, seq, hkv, d)) * cap["scale"]
    p = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1).mean(2)
    return p, causal


# ------------------------------------------------------------------------------------------ main

RUNS = {
    # name: (overrides, description)
    "base": ([], "default tiny_cpu: 20 warmup + 40 sparse steps, content-only index branch"),
    "base_idx_only": (["checkpoint.init_from={base}", "stage.run=sparse",
                       "stage.sparse.trainable=indexer_only", "stage.sparse.tokens={idx_tokens}"],
                      "from base@60: sparse, indexer_only, content-only index branch"),
    "rope": (["attention.index_rope=true"], "tiny_cpu with attention.index_rope=true"),
    "rope_idx_only": (["attention.index_rope=true", "checkpoint.init_from={base}", "stage.run=sparse",
                       "stage.sparse.trainable=indexer_only", "stage.sparse.tokens={idx_tokens}"],
                      "from base@60: sparse, indexer_only, index RoPE switched on"),
}


def part_train(workdir: str, idx_steps: int) -> dict[str, list[dict]]:
    base_ckpt = os.path.join(workdir, "base", "ckpt")
    fmt = {"base": base_ckpt, "idx_tokens": idx_steps * 8 * 512}
    out = {}
    for name, (overrides, _) in RUNS.items():
        path = run_trainer(workdir, name, [o.format(**fmt) for o in overrides])
        out[name] = read_metrics(path)
    return out


def checkpoints(workdir: str) -> dict[str, str]:
    """label -> iter dir of every checkpoint the analysis reads."""
    found = {}
    for name in RUNS:
        ckpt = os.path.join(workdir, name, "ckpt")
        if not os.path.isdir(ckpt):
            continue
        for entry in sorted(os.listdir(ckpt)):
            if entry.startswith("iter_"):
                found[f"{name}@{int(entry[5:])}"] = os.path.join(ckpt, entry)
    return found


def part_analyze(workdir: str, fit_steps: int, num_batches: int = 2) -> dict:
    from msa_train.compat import destroy_parallel, init_parallel

    init_parallel({})
    gen = torch.Generator().manual_seed(0)
    results: dict = {"layers": {}, "fit": {}}
    weights: dict[str, dict[int, torch.Tensor]] = {}
    try:
        for label, iter_dir in checkpoints(workdir).items():
            model, cfg = load_checkpoint_model(iter_dir)
            batches = validation_batches(cfg, num_batches, 4)
            caps = [capture_layers(model, b) for b in batches]
            per_layer = {}
            for layer in sorted(caps[0]):
                reports = [layer_report(c[layer], cfg, gen) for c in caps]
                per_layer[layer] = {k: sum(r[k] for r in reports) / len(reports) for k in reports[0]}
            for layer, core in _index_weights(model).items():
                per_layer[layer]["index_weight_norm"] = float(core.norm())
                ref = weights.get(_reference_label(label), {}).get(layer)
                if ref is not None:  # the optimizer moved the index branch (not frozen / dropped)
                    per_layer[layer]["index_weight_rel_change"] = float((core - ref).norm() / ref.norm())
            weights[label] = _index_weights(model)
            results["layers"][label] = per_layer
            print(f"[analyze] {label}: " + "  ".join(
                f"L{l} kl {r['kl_sparse']:.4f}/unif {r['kl_sparse_uniform']:.4f} "
                f"score {r['score_recall']:.3f} (rand {r['score_recall_random']:.3f}, "
                f"oracle {r['score_recall_oracle']:.3f})" for l, r in per_layer.items()), flush=True)
            if label == "base@60":  # what an index branch CAN reach on this frozen backbone
                for layer in sorted(caps[0]):
                    fits = {}
                    for variant, rope, di in (("content_only", False, None), ("content_only_di128", False, 128),
                                              ("index_rope", True, None)):
                        fits[variant] = fit_indexer([caps[0][layer]], [caps[1][layer]], cfg, rope,
                                                    fit_steps, di)
                    results["fit"][layer] = fits
                    print(f"[analyze] fit {label} L{layer}: " + "  ".join(
                        f"{v} {f['fit_test_kl']:.4f}" for v, f in fits.items()), flush=True)
    finally:
        destroy_parallel()
    return results


def _index_weights(model) -> dict[int, torch.Tensor]:
    from msa_train.model import MSACoreAttention

    return {m.layer_number: torch.cat([m.indexer.linear_qi.weight.detach().flatten(),
                                       m.indexer.weight_ki.detach().flatten()])
            for m in model.modules() if isinstance(m, MSACoreAttention) and m.is_msa}


def _reference_label(label: str) -> str:
    """The checkpoint a run's index weights are compared with: the previous stage boundary."""
    name, step = label.split("@")
    if name.endswith("idx_only"):
        return "base@60"
    return f"{name}@20" if int(step) > 20 else ""


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for mode, curve in results.get("unit", {}).items():
        ax.semilogy(curve, label=f"{mode} KL")
    ax.set(title="unit: W_qi/W_ki only, learnable teacher", xlabel="Adam step", ylabel="KL")
    ax.legend()
    ax = axes[1]
    styles = {"base": "C0-", "rope": "C1-", "base_idx_only": "C0:", "rope_idx_only": "C1:"}
    for name, rows in results.get("train", {}).items():
        steps = [r["step"] for r in rows if "train/indexer_kl" in r]
        kls = [r["train/indexer_kl"] for r in rows if "train/indexer_kl" in r]
        ax.semilogy(steps, kls, styles.get(name, "-"), label=name)
    ax.axvline(20, color="gray", lw=0.8)
    ax.set(title="trainer: train/indexer_kl (mean over MSA layers)", xlabel="step", ylabel="KL")
    ax.legend(fontsize=8)
    ax = axes[2]
    layers = results.get("analyze", {}).get("layers", {})
    labels = [l for l in ("base@60", "base_idx_only@120", "rope@60", "rope_idx_only@120") if l in layers]
    if labels:
        last = max(layers[labels[0]])
        width = 0.8 / 3
        xs = range(len(labels))
        for j, (key, name) in enumerate((("score_recall_random", "random"), ("score_recall", "indexer"),
                                         ("score_recall_oracle", "oracle"))):
            ax.bar([x + (j - 1) * width for x in xs], [layers[l][last][key] for l in labels], width,
                   label=name)
        ax.set_xticks(list(xs), labels, rotation=15, fontsize=8)
        ax.set(title=f"score recall, last MSA layer ({last}), held-out", ylim=(0, 1))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=70)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="runs, checkpoints and results go here")
    ap.add_argument("--only", choices=("unit", "train", "analyze"), default=None)
    ap.add_argument("--idx-steps", type=int, default=100, help="indexer-only continuation steps")
    ap.add_argument("--fit-steps", type=int, default=150, help="Adam steps of the offline fit")
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    out_json = os.path.join(args.workdir, "results.json")
    results = {}
    if os.path.isfile(out_json):  # parts run separately (--only) accumulate into one file
        with open(out_json) as f:
            results = json.load(f)
    torch.manual_seed(0)
    if args.only in (None, "unit"):
        results["unit"] = unit_curves()
        c = results["unit"]
        print("[unit] " + "  ".join(f"{m}: {v[0]:.3g} -> {v[-1]:.3g} ({v[0] / v[-1]:.0f}x)"
                                    for m, v in c.items()), flush=True)
    if args.only in (None, "train"):
        results["train"] = part_train(args.workdir, args.idx_steps)
    if args.only in (None, "analyze"):
        results["analyze"] = part_analyze(args.workdir, args.fit_steps)
    with open(out_json, "w") as f:
        json.dump(results, f, indent=1)
    png = os.path.join(args.workdir, "tiny_study.png")
    plot(results, png)
    print(f"results: {out_json}\nplot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
