#!/usr/bin/env python3
"""Training throughput of an MSA model and its dense-GQA twin on one GPU, measured in the same run.

    python tools/bench_throughput.py                       # proxy_109b vs its twin at 8K, 32K, 128K
    python tools/bench_throughput.py --model small --attention paper --seq 8192 32768
    python tools/bench_throughput.py --seq 32768 --steps 6 --json out.json --markdown out.md

Each step trains max(--tokens-per-step, seq) tokens; sequences of --recompute-from tokens or more
run with full activation recompute (one layer at a time), both models alike.

The twin is the same model with full causal attention in every layer (attention.layer_map all 0:
no index branch, torch SDPA flash/cuDNN attention). The MSA model trains in the sparse stage
(top-k block-sparse attention + indexer KL). Both run the trainer's own step (msa_train.trainer:
Megatron DDP, distributed optimizer, bf16) on synthetic tokens, so the numbers are what training
sees, minus the data loader.

Each configuration (length x variant) runs in its own child process, so allocator caches, compiled
kernels and tensors of one never reach the next. Variants: `msa` and `dense` as configured, and
`msa_unfused` / `dense_unfused` with the speed switches off (model.moe_grouped_gemm,
model.fused_activation, model.lm_loss, train.fused_adam: the reference paths).

Per configuration: build, at least `--warmup` untimed steps and more until two consecutive steps
agree within 10% (Triton compiles each kernel variant the first time a step takes its path; the
allocator settles), then `--steps` timed steps, each between CUDA synchronizations (per-step times
are in the JSON and the table, so a slow outlier is visible, not averaged away). Reported: tokens/s, TFLOP/s by msa_train.model.flops
(MoE on active parameters, attention on the pairs computed; the twin's own dense count), MFU
against the card's dense bf16 peak (none for an unknown card), the MSA model's dense-equivalent
TFLOP/s, peak memory, and the MSA / twin tokens/s ratio per length. A configuration whose loss is
not finite is reported as failed, never as a speedup.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

# MSA tokens/s over the twin's, at the 109B layer shape (docs/THROUGHPUT.md).
TARGET_SPEEDUP = {32768: 1.6, 131072: 3.0}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ensure_importable() -> None:
    """Run from a plain checkout (the GPU box has no editable install): put the repository on
    sys.path and register ./kernels under its import name, msa_kernels."""
    import importlib.util

    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    try:
        import msa_kernels  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "msa_kernels":
            raise
        init = os.path.join(REPO, "kernels", "__init__.py")
        spec = importlib.util.spec_from_file_location(
            "msa_kernels", init, submodule_search_locations=[os.path.dirname(init)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["msa_kernels"] = module
        spec.loader.exec_module(module)


def _compose(model: str, attention: str, seq: int, tokens_per_step: int, extra: List[str],
             recompute: bool = False):
    from msa_train.dry_run import compose

    tokens_per_step = max(tokens_per_step, seq)
    if tokens_per_step % seq:
        raise ValueError(f"--tokens-per-step {tokens_per_step} must be a multiple of --seq {seq}")
    memory = (["train.recompute_granularity=full", "train.recompute_method=uniform",
               "train.recompute_num_layers=1"] if recompute
              else ["train.recompute_granularity=null"])
    return compose([f"model={model}", f"attention={attention}", "parallel=single", "data=mock",
                    "logging=none", "checkpoint=none", "stage.run=sparse",
                    f"train.seq_length={seq}", "train.micro_batch_size=1",
                    f"train.global_batch_size={tokens_per_step // seq}",
                    *memory, "train.eval_interval=null", *extra])


def _twin(cfg):
    """Same model, full attention everywhere (no MSA layer, no index branch)."""
    twin = copy.deepcopy(cfg)
    twin.attention.layer_map = [0] * int(cfg.model.num_layers)
    twin.attention.layer_ids = None
    return twin


def _batches(vocab: int, seq: int, device, seed: int):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    while True:
        tokens = torch.randint(0, vocab, (1, seq + 1), generator=g).to(device)
        yield {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
               "loss_mask": torch.ones(1, seq, device=device),
               "position_ids": torch.arange(seq, device=device)[None]}


# GPU-kernel categories of the profile breakdown, first match wins (kernel names, lower case).
KERNEL_CATEGORIES = (
    ("msa_select", ("_select_blocks_kernel",)),
    ("msa_kl", ("_kl_", "_dense_lse_kernel")),
    ("msa_attention", ("_sparse_fwd_kernel", "_sparse_bwd_", "_delta_kernel", "_union_tiles_kernel")),
    ("dense_attention", ("sdpa", "fmha", "flash", "attention")),
    ("loss", ("cross_entropy", "log_softmax", "logsoftmax", "nll_loss", "logsumexp")),
    ("optimizer", ("adam", "multi_tensor", "l2norm")),
    ("moe_routing", ("index_select", "indexselect", "scatter", "sort", "topk", "masked_select",
                     "histc", "bincount", "cumsum", "gather")),
    ("norm_act", ("rms_norm", "rmsnorm", "layer_norm", "silu", "swiglu", "triton_poi",
                  "triton_red", "triton_per")),
    ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "wgmma", "grouped_mm")),
)
def kernel_breakdown(kernels, wall_ms: Optional[float] = None) -> Dict[str, float]:
    """ms per category from (kernel name, device microseconds) pairs; the rest is "other".
    With the step's wall time, "host_gap" is the time the GPU ran no kernel (launch-bound or
    waiting on the host)."""
    out = {name: 0.0 for name, _ in KERNEL_CATEGORIES}
    out["other"] = 0.0
    for name, us in kernels:
        low = name.lower()
        cat = next((c for c, keys in KERNEL_CATEGORIES if any(k in low for k in keys)), "other")
        out[cat] += us / 1e3
    out["total"] = sum(out.values())
    if wall_ms is not None:
        out["host_gap"] = max(0.0, wall_ms - out["total"])
    return {k: round(v, 2) for k, v in out.items()}


def _profile_step(step, path: str, cuda: bool,
                  wall_ms: Optional[float] = None) -> Optional[Dict[str, float]]:
    """One extra step under torch.profiler: the kernel table tells where a slow configuration's
    time goes (our Triton kernels vs SDPA vs the MoE GEMMs vs the optimizer) without a second run."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    avg = prof.key_averages()
    key = "self_cpu_time_total"
    if cuda:
        key = "self_device_time_total" if hasattr(avg[0], "self_device_time_total") else "self_cuda_time_total"
    with open(path, "w") as f:
        f.write(avg.table(sort_by=key, row_limit=45, max_name_column_width=90))
    if not cuda:
        return None
    from torch.autograd import DeviceType

    # Kernel-level events only (operators such as aten::mm would count their kernels twice).
    # User annotations (e.g. "Optimizer.step#AdamW.step") carry their kernels' time again.
    kernels = [(e.key, getattr(e, key)) for e in avg
               if getattr(e, "device_type", None) == DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False) and "#" not in e.key]
    return kernel_breakdown(kernels, wall_ms) if kernels else None  # a profiler without kernel events: table only


def _timed(step, cuda: bool):
    import torch

    t0 = time.perf_counter()
    result = step()
    if cuda:
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def measure(cfg, runtime, variant: str, warmup: int, steps: int,
            profile_path: Optional[str] = None, max_warmup: int = 12, settle: float = 0.1) -> Dict:
    import torch

    from msa_train.data import padded_vocab_size
    from msa_train.metrics.throughput import FlopsPerToken
    from msa_train.trainer.schedule import build_plan
    from msa_train.trainer.setup import build_stage
    from msa_train.trainer.step import train_step
    from omegaconf import OmegaConf

    seq = int(cfg.train.seq_length)
    gbs = int(cfg.train.global_batch_size)
    plan = build_plan(cfg.stage, cfg.train)
    stage = plan.stage("sparse")
    model_cfg, attn_cfg = OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.attention)
    # Synthetic tokens over the model's own vocabulary (not the data tokenizer's), so the output
    # layer has the size the FLOP count assumes.
    vocab = padded_vocab_size(int(model_cfg.vocab_size),
                              int(cfg.data.tokenizer.make_vocab_size_divisible_by), 1)
    fpt = FlopsPerToken.for_model(model_cfg, attn_cfg, seq, "sparse")
    if variant == "dense":  # the twin's own work is its dense-equivalent count
        fpt = FlopsPerToken(actual=fpt.dense_equiv, dense_equiv=fpt.dense_equiv)
    cuda = runtime.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    objs = build_stage(cfg, runtime, stage, vocab)
    it = _batches(int(model_cfg.vocab_size), seq, runtime.device, int(cfg.train.seed))

    def step():
        return train_step(objs.chunks, objs.optimizer, objs.scheduler, objs.config, it,
                          num_microbatches=gbs, seq_length=seq, micro_batch_size=1,
                          global_batch_size=gbs, device=runtime.device, cp_size=1)

    losses, warm_times, times, breakdown = [], [], [], None
    try:
        # Warm up until two consecutive steps agree within `settle`: a kernel path first taken a
        # few steps in (the selection pattern changes as the indexer trains; Triton compiles each
        # new kernel variant once, seconds each) must not land in the timed steps.
        while len(warm_times) < max(warmup, 0) or (
                len(warm_times) < max_warmup and len(warm_times) >= 2
                and abs(warm_times[-1] - warm_times[-2]) > settle * warm_times[-1]):
            result, dt = _timed(step, cuda)
            losses.append(_loss_value(result))
            warm_times.append(dt)
        for _ in range(steps):
            result, dt = _timed(step, cuda)
            losses.append(_loss_value(result))
            times.append(dt)
        seconds = sum(times)
        breakdown = (_profile_step(step, profile_path, cuda, 1e3 * statistics.median(times))
                     if profile_path else None)
    finally:
        mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        objs = None  # drop the model and optimizer before collecting
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    ok = all(l is not None and math.isfinite(l) for l in losses)
    tps = steps * gbs * seq / seconds
    return {"variant": variant, "seq_len": seq, "tokens_per_step": gbs * seq, "steps": steps,
            "seconds": seconds, "tokens_per_sec": tps, "flops_per_token": fpt.actual,
            "dense_equiv_flops_per_token": fpt.dense_equiv, "tflops": tps * fpt.actual / 1e12,
            "dense_equiv_tflops": tps * fpt.dense_equiv / 1e12, "max_mem_gib": mem,
            "final_loss": losses[-1] if losses else None, "ok": ok,
            "warmup_step_ms": [round(1e3 * t, 1) for t in warm_times],
            "profile_gpu_ms": breakdown,
            "step_ms": [round(1e3 * t, 1) for t in times]}


def _fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def _loss_value(result) -> Optional[float]:
    """The step keeps its loss on the device (no host sync); read it after the step's timing."""
    return None if result.lm_loss is None else float(result.lm_loss)


def _seq_label(seq: int) -> str:
    return f"{seq // 1024}K" if seq % 1024 == 0 else str(seq)


VARIANT_NAMES = {"msa": "MSA (sparse stage)", "dense": "dense-GQA twin",
                 "msa_unfused": "MSA, switches off", "dense_unfused": "twin, switches off"}
TWIN_OF = {"msa": "dense", "msa_unfused": "dense_unfused"}


def markdown(results: List[Dict], device: str, peak: Optional[float], meta: Dict) -> str:
    lines = [f"Card: **{device}** (dense bf16 peak "
             f"{_fmt(peak, '.1f', 'unknown')} TFLOP/s). {meta['model']} model "
             f"({meta['params']}), attention={meta['attention']}, {meta['tokens_per_step']} "
             f"tokens per step, >= {meta['warmup']} warmup steps (until two agree within 10%) + "
             f"{meta['steps']} timed steps, "
             f"torch {meta['torch']}, triton {meta['triton']}."
             + (" Speed switches: " + ", ".join(f"model.{k}={v}" for k, v in
                                               meta["switches"].items()) + "."
                if meta.get("switches") else ""), "",
             "| seq | model | tokens/s | step ms: median (min-max) | TFLOP/s | MFU | "
             "dense-equiv TFLOP/s | peak mem GiB | MSA / dense tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["seq_len"], r["variant"]): r for r in results}
    for r in results:
        ratio = ""
        twin = TWIN_OF.get(r["variant"])
        if twin and (r["seq_len"], twin) in by:
            d = by[(r["seq_len"], twin)]
            if r["ok"] and d["ok"]:
                x = r["tokens_per_sec"] / d["tokens_per_sec"]
                target = TARGET_SPEEDUP.get(r["seq_len"])
                ratio = f"**{x:.2f}x**" + (f" (target {target}x: {'met' if x >= target else 'NOT met'})"
                                           if target else "")
            else:
                ratio = "n/a (a run failed)"
        name = VARIANT_NAMES[r["variant"]]
        mfu_s = "-" if peak is None or not r["ok"] else f"{100 * r['tflops'] / peak:.1f}%"
        ms = r.get("step_ms") or []
        ms_s = f"{statistics.median(ms):.0f} ({min(ms):.0f}-{max(ms):.0f})" if ms else "-"
        lines.append(f"| {_seq_label(r['seq_len'])} | {name} | {r['tokens_per_sec']:,.0f} | {ms_s} | "
                     f"{r['tflops']:.1f} | {mfu_s} | "
                     f"{r['dense_equiv_tflops']:.1f} | {_fmt(r['max_mem_gib'], '.1f')} | {ratio} |"
                     if r["ok"] else
                     f"| {_seq_label(r['seq_len'])} | {name} | FAILED "
                     f"({r.get('error') or 'loss ' + str(r['final_loss'])}) | | | | | | |")
    prof = [r for r in results if r.get("ok") and r.get("profile_gpu_ms")]
    if prof:
        cats = list(prof[0]["profile_gpu_ms"])
        lines += ["", "GPU time of one profiled step (ms, torch.profiler kernel time by category):", "",
                  "| seq | model | " + " | ".join(cats) + " |", "|---|---|" + "---|" * len(cats)]
        for r in prof:
            name = VARIANT_NAMES[r["variant"]]
            lines.append(f"| {_seq_label(r['seq_len'])} | {name} | "
                         + " | ".join(f"{r['profile_gpu_ms'][c]:.1f}" for c in cats) + " |")
    return "\n".join(lines) + "\n"


# The speed switches off (model.* fields; docs/THROUGHPUT.md): the reference implementations.
UNFUSED = ["model.moe_grouped_gemm=false", "model.fused_activation=false", "model.lm_loss=megatron",
           "train.fused_adam=false"]
VARIANTS = ("msa", "dense", "msa_unfused", "dense_unfused")


def _variant_cfg(a, seq: int, variant: str):
    extra = list(a.overrides) + (UNFUSED if variant.endswith("_unfused") else [])
    cfg = _compose(a.model, a.attention, seq, a.tokens_per_step, extra, seq >= a.recompute_from)
    return cfg if variant.startswith("msa") else _twin(cfg)


def _measure_one(a, seq: int, variant: str) -> Dict:
    """One configuration in this process (the parent runs each in a fresh child process, so no
    allocator cache, compiled-kernel state or leaked tensor carries over between them)."""
    import torch

    from msa_train.metrics.peaks import current_device_name, resolve_peak_tflops
    from msa_train.trainer.runtime import init_runtime, shutdown_runtime

    cfg = _variant_cfg(a, seq, variant)
    runtime = init_runtime(cfg.train, cfg.parallel)
    try:
        prof = (os.path.join(a.profile, f"profile_{variant}_{_seq_label(seq)}.txt")
                if a.profile else None)
        r = measure(cfg, runtime, variant, a.warmup, a.steps, prof)
    finally:
        shutdown_runtime()
    r["device"] = current_device_name() or "CPU"
    r["peak_tflops"] = (resolve_peak_tflops(cfg.logging.peak_tflops)
                        if torch.cuda.is_available() else None)
    return r


def _run_child(argv: List[str], seq: int, variant: str, timeout: int) -> Dict:
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--one", str(seq), variant,
               "--result-file", out.name]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"variant": variant, "seq_len": seq, "ok": False, "final_loss": None,
                    "error": f"timed out after {timeout}s"}
        text = out.read()
    if proc.returncode == 0 and text:
        return json.loads(text)
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
    return {"variant": variant, "seq_len": seq, "ok": False, "final_loss": None,
            "error": f"exit {proc.returncode}: " + " | ".join(tail)[-300:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="proxy_109b", help="configs/model entry")
    ap.add_argument("--attention", default="proxy_109b", help="configs/attention entry")
    ap.add_argument("--seq", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--recompute-from", type=int, default=131072,
                    help="full activation recompute for sequences this long or longer")
    ap.add_argument("--tokens-per-step", type=int, default=32768)
    ap.add_argument("--warmup", type=int, default=3,
                    help="untimed steps at least; more (up to 12) until two consecutive steps agree within 10%%")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=["msa", "dense"], choices=VARIANTS,
                    help="msa / dense: the models as configured; *_unfused: with the speed "
                         "switches off (grouped experts, fused activation, fused loss)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    ap.add_argument("--json", default=None, help="write the raw results here")
    ap.add_argument("--markdown", default=None, help="write the results table here")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="also profile one extra step per configuration: DIR/profile_<variant>_<seq>.txt")
    ap.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (e.g. train.precision=fp32)")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = ap.parse_args(argv)
    if a.steps < 1 or a.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    _ensure_importable()
    if a.profile:
        os.makedirs(a.profile, exist_ok=True)
    if a.one is not None:  # child: one configuration
        r = _measure_one(a, int(a.one[0]), a.one[1])
        with open(a.result_file, "w") as f:
            json.dump(r, f)
        return 0

    from omegaconf import OmegaConf

    from msa_train.metrics.progress import format_count
    from msa_train.model.flops import count_parameters

    results = []
    for seq in a.seq:
        for variant in a.variants:
            r = _run_child(argv, seq, variant, a.timeout)
            print(json.dumps(r), flush=True)
            results.append(r)
    first = _variant_cfg(a, a.seq[0], "msa")
    counts = count_parameters(OmegaConf.to_object(first.model), OmegaConf.to_object(first.attention))
    import torch
    import triton

    device = next((r["device"] for r in results if r.get("device")), "unknown")
    peak = next((r["peak_tflops"] for r in results if r.get("peak_tflops")), None)
    meta = {"model": a.model, "attention": a.attention, "tokens_per_step": a.tokens_per_step,
            "warmup": a.warmup, "steps": a.steps, "torch": torch.__version__,
            "triton": triton.__version__,
            "switches": {k: OmegaConf.select(first, f"model.{k}")
                         for k in ("moe_grouped_gemm", "fused_activation", "lm_loss")},
            "params": f"{format_count(counts.total)} total / {format_count(counts.active)} active "
                      "params"}
    table = markdown(results, device, peak, meta)
    print(table)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": device, "peak_tflops": peak, "meta": meta, "results": results}, f,
                      indent=1)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(table)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
