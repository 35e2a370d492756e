#!/usr/bin/env python3
"""Do the speed switches change training? Same model, data and seed trained with the switches on
and off; the loss curves must agree within the run-to-run bf16 noise.

    python tools/speed_switch_parity.py --out runs/switch_parity          # proxy_109b, 50 steps
    python tools/speed_switch_parity.py --out OUT model=small attention=paper

Three runs of the trainer (`python -m msa_train.train`), each 50 optimizer steps on real text
(data=stdlib): `off_a` and `off_b` with the switches off (model.moe_grouped_gemm=false,
model.fused_activation=false, model.lm_loss=megatron, train.fused_adam=false) and `on` with the
configured switches. The
attention backward accumulates with atomics (attention.deterministic=false), so `off_a` and
`off_b` differ only by the order of floating-point additions: their largest per-step loss gap is
the noise band. The switches pass when `on` stays within twice that band of `off_a` at every step
(and within 0.02 where the band is smaller). Writes OUT/parity.json, OUT/parity.md and
OUT/loss_curves.png; exit 1 when the check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFF = ["model.moe_grouped_gemm=false", "model.fused_activation=false", "model.lm_loss=megatron",
       "train.fused_adam=false"]
MIN_BAND = 0.02  # loss units: bf16 noise floor when two runs happen to agree closely


def _defaults(steps: int, seq: int, batch: int, warmup_steps: int) -> List[str]:
    tokens = seq * batch
    return ["model=proxy_109b", "attention=proxy_109b", "data=stdlib", "logging=none",
            "logging.log_interval=1", "logging.plot_at_end=false", "checkpoint=none",
            "attention.deterministic=false", f"train.seq_length={seq}",
            "train.micro_batch_size=1", f"train.global_batch_size={batch}",
            f"stage.warmup.tokens={warmup_steps * tokens}",
            f"stage.sparse.tokens={(steps - warmup_steps) * tokens}", "train.lr_warmup_steps=5"]


def _train(run_dir: str, overrides: List[str], timeout: int) -> Dict[int, float]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "msa_train.train", f"run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({' '.join(cmd)}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return {r["step"]: r["train/lm_loss"] for r in rows if r.get("train/lm_loss") is not None}


def compare(off_a: Dict[int, float], off_b: Dict[int, float], on: Dict[int, float]) -> Dict:
    steps = sorted(set(off_a) & set(off_b) & set(on))
    if not steps:
        raise ValueError("the runs logged no common step")
    band = max(abs(off_a[s] - off_b[s]) for s in steps)
    limit = max(2 * band, MIN_BAND)
    gap = max(abs(on[s] - off_a[s]) for s in steps)
    return {"steps": len(steps), "noise_band": band, "limit": limit, "max_gap": gap,
            "final": {"off_a": off_a[steps[-1]], "off_b": off_b[steps[-1]], "on": on[steps[-1]]},
            "ok": gap <= limit}


def _plot(curves: Dict[str, Dict[int, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        steps = sorted(curve)
        ax.plot(steps, [curve[s] for s in steps], label=name, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("train/lm_loss")
    ax.set_title("speed switches on vs off")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory (one run dir per variant)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup-steps", type=int, default=10, help="indexer-warmup steps of --steps")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per training run")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    a = ap.parse_args(argv)
    if not 0 <= a.warmup_steps < a.steps:
        ap.error("--warmup-steps must be in [0, --steps)")
    os.makedirs(a.out, exist_ok=True)
    base = _defaults(a.steps, a.seq, a.batch, a.warmup_steps) + list(a.overrides)
    variants = {"off_a": base + OFF, "off_b": base + OFF, "on": base}
    curves = {}
    for name, overrides in variants.items():
        print(f"[{len(curves) + 1}/{len(variants)}] {name}", flush=True)
        curves[name] = _train(os.path.join(a.out, name), overrides, a.timeout)
    result = compare(curves["off_a"], curves["off_b"], curves["on"])
    result["command"] = " ".join(["python tools/speed_switch_parity.py", *sys.argv[1:]])
    _plot(curves, os.path.join(a.out, "loss_curves.png"))
    with open(os.path.join(a.out, "parity.json"), "w") as fh:
        json.dump({**result, "curves": curves}, fh, indent=1)
    md = (f"Speed switches on vs off, {result['steps']} steps: largest loss gap "
          f"{result['max_gap']:.4f} vs noise band {result['noise_band']:.4f} (limit "
          f"{result['limit']:.4f}): **{'within' if result['ok'] else 'OUTSIDE'} the band**. "
          f"Final loss: on {result['final']['on']:.4f}, off {result['final']['off_a']:.4f} / "
          f"{result['final']['off_b']:.4f}.\n")
    with open(os.path.join(a.out, "parity.md"), "w") as fh:
        fh.write(md)
    print(md)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
