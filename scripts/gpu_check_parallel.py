#!/usr/bin/env python
"""GPU check: MSA-MoE training step under TP2 (+SP) and CP2 with NCCL and the Triton kernels vs one GPU.

Runs tests/model/dist_parity.py three times (single-GPU reference, then torchrun on 2 GPUs with
--tp 2 --sp and with --cp 2) on a 4-layer MSA-MoE model (hidden 256, GQA 8/2 x 64, 4 experts,
block 64, top-4, seq 512, fp32), forcing MSA_KERNELS_BACKEND=triton, and compares loss, indexer KL,
every gradient and the parameters after one Adam step. Needs >= 2 GPUs and megatron-core.

  python scripts/gpu_check_parallel.py --out-dir $OUT     # summary: $OUT/gpu_parity.json
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


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out-dir", default="gpu_parity_out")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--timeout", type=int, default=240)
    args = p.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

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
    ok = all(summary[k]["rc"] == 0 and summary[k]["result"] and summary[k]["result"].get("ok", True)
             for k in ("reference", "tp2_sp", "cp2"))
    summary["ok"] = ok
    (out_dir / "gpu_parity.json").write_text(json.dumps(summary, indent=1))
    print("GPU_PARITY " + json.dumps(summary), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
