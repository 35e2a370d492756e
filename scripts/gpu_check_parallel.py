#!/usr/bin/env python
"""GPU check: MSA-MoE training step under TP2 (+SP) and CP2 with NCCL and the Triton kernels vs one GPU.

Runs tests/model/dist_parity.py three times (single-GPU reference, then torchrun on 2 GPUs with
--tp 2 --sp and with --cp 2) on a 4-layer MSA-MoE model (hidden 256, GQA 8/2 x 64, 4 experts,
block 64, top-4, seq 512, fp32), forcing MSA_KERNELS_BACKEND=triton, and compares loss, indexer KL,
every gradient and the parameters after one Adam step. Needs >= 2 GPUs and megatron-core.

  python scripts/gpu_check_parallel.py --out-dir $OUT     # summary: $OUT/gpu_parity.json
A second phase (``--smoke``, on by default) trains the one-GPU ``small`` config (bf16, seq 4096)
for a few steps in dense and sparse mode and reports step time and indexer KL: the full model with
the Triton kernels, not only the tiny parity model.
Results are recorded in tests/model/GPU_RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "model" / "dist_parity.py"


def run(name, cmd, env, out_dir: Path, timeout: int):
    t0 = time.time()
    with open(out_dir / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=timeout, start_new_session=True)
    text = (out_dir / f"{name}.log").read_text()
    lines = [l for l in text.splitlines() if l.startswith("PARITY ")]
    result = json.loads(lines[-1][len("PARITY "):]) if lines else None
    print(f"[{name}] rc={proc.returncode} {time.time() - t0:.1f}s {json.dumps(result)}", flush=True)
    if result is None:
        print(text[-3000:], flush=True)
    return {"rc": proc.returncode, "seconds": round(time.time() - t0, 1), "result": result}


def smoke(out_dir: Path, seq: int, steps: int) -> dict:
    """In-process (one GPU): the small config, bf16, forward+backward+Adam per mode."""
    import torch
    from omegaconf import OmegaConf

    from msa_train.compat import destroy_parallel, init_parallel
    from msa_train.model import (
        AttentionConfig, ModelConfig, build_model, build_transformer_config, kl_loss_scale,
        kl_tracker, set_kl_loss_scale, set_msa_mode,
    )

    def load(group, name, schema):
        raw = OmegaConf.load(REPO / "configs" / group / f"{name}.yaml")
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), raw))

    init_parallel({})
    model_cfg, attn_cfg = load("model", "small", ModelConfig), load("attention", "paper", AttentionConfig)
    config = build_transformer_config(model_cfg, attn_cfg, {}, torch.bfloat16,
                                      use_cpu_initialization=False)
    model = build_model(config, max_seq_len=seq).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    set_kl_loss_scale(kl_loss_scale(1))
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = {"model": "small", "seq": seq, "params": sum(p.numel() for p in model.parameters())}
    for mode in ("dense", "sparse"):
        set_msa_mode(model, mode)
        times, losses = [], []
        for step in range(steps + 2):
            tokens = torch.randint(0, model_cfg.vocab_size, (1, seq), device="cuda", generator=gen)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = model(tokens, None, None, labels=tokens).float().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if step >= 2:  # the first steps compile the Triton kernels
                times.append(time.perf_counter() - t0)
            losses.append(float(loss))
        kl = kl_tracker.get_kl_metrics(reset=True)
        result[mode] = {
            "ms_per_step": round(1000 * sum(times) / len(times), 1),
            "tokens_per_s": round(seq * len(times) / sum(times)),
            "losses": [round(x, 4) for x in losses],
            "indexer_kl_mean": round(sum(kl.values()) / len(kl), 5) if kl else None,
            "finite": all(x == x for x in losses),
        }
        print(f"[smoke] {mode}: {json.dumps(result[mode])}", flush=True)
    result["max_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    destroy_parallel()
    (out_dir / "gpu_smoke.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out-dir", default="gpu_parity_out")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--timeout", type=int, default=240)
    p.add_argument("--no-smoke", dest="smoke", action="store_false")
    p.add_argument("--smoke-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--smoke-seq", type=int, default=4096)
    p.add_argument("--smoke-steps", type=int, default=3)
    args = p.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.smoke_only:
        return 0 if smoke(out_dir, args.smoke_seq, args.smoke_steps) else 1

    import torch

    if torch.cuda.device_count() < 2:
        raise SystemExit(f"needs >= 2 GPUs, found {torch.cuda.device_count()}")
    env = dict(os.environ, MSA_KERNELS_BACKEND="triton", OMP_NUM_THREADS="4",
               PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore",
               TRITON_CACHE_DIR="/tmp/msa_triton_cache")  # shared by the three runs
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    ref = out_dir / "ref.pt"
    common = ["--gpu-size", "--seq", "512", "--tol", str(args.tol)]
    summary = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "tol": args.tol}
    summary["reference"] = run("ref_1gpu", [sys.executable, str(SCRIPT), "--make-ref", "--ref", str(ref), *common],
                               dict(env, CUDA_VISIBLE_DEVICES="0"), out_dir, args.timeout)
    for name, flags in (("tp2_sp", ["--tp", "2", "--sp"]), ("cp2", ["--cp", "2"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(SCRIPT), "--ref", str(ref), *common, *flags]
        summary[name] = run(name, cmd, env, out_dir, args.timeout)
    if args.smoke:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--smoke-only", "--out-dir", str(out_dir),
               "--smoke-seq", str(args.smoke_seq), "--smoke-steps", str(args.smoke_steps)]
        summary["smoke"] = run("smoke_small", cmd, dict(env, CUDA_VISIBLE_DEVICES="0"), out_dir,
                               args.timeout)
        smoke_file = out_dir / "gpu_smoke.json"
        summary["smoke"]["result"] = json.loads(smoke_file.read_text()) if smoke_file.exists() else None
    ok = all(summary[k]["rc"] == 0 and summary[k]["result"] and summary[k]["result"].get("ok", True)
             for k in ("reference", "tp2_sp", "cp2"))
    if args.smoke:
        smoke_res = summary["smoke"]["result"] or {}
        summary["smoke_ok"] = summary["smoke"]["rc"] == 0 and all(
            smoke_res.get(m, {}).get("finite") for m in ("dense", "sparse"))
        ok = ok and summary["smoke_ok"]
    summary["ok"] = ok
    (out_dir / "gpu_parity.json").write_text(json.dumps(summary, indent=1))
    print("GPU_PARITY " + json.dumps(summary), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
