"""Helpers for the trainer tests: run `msa-train` in a subprocess, read metrics and checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A smaller-than-default run for the tests that train several times: 3 warmup + 3 sparse steps of
# 4 x 256 tokens; still sparse (topk 4 x block 16 = 64 of 256 keys).
SMALL = [
    "train.seq_length=256", "train.micro_batch_size=2", "train.global_batch_size=4",
    "stage.warmup.tokens=3072", "stage.sparse.tokens=3072", "train.lr_warmup_steps=1",
    "logging=none", "logging.log_interval=1", "logging.plot_at_end=false", "logging.console=false",
    "checkpoint.keep_last_k=null",
]


def run_train(args: Sequence[str], run_dir: str, *, nproc: int = 1, timeout: int = 300,
              expect_rc: Optional[int] = 0) -> subprocess.CompletedProcess:
    """`python -m msa_train.train <args>` (or torchrun with nproc ranks) in its own process group,
    killed as a group on timeout so no worker outlives the test."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled",
               HYDRA_FULL_ERROR="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    if nproc == 1:
        cmd = [sys.executable, "-m", "msa_train.train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "msa_train.train"]
    cmd += [f"run_dir={run_dir}", *args]
    proc = subprocess.Popen(cmd, cwd=os.getcwd(), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"msa-train timed out after {timeout}s:\n{out[-4000:]}")
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, "")
    if expect_rc is not None:
        assert proc.returncode == expect_rc, f"exit {proc.returncode}:\n{out[-6000:]}"
    return result


def read_metrics(run_dir: str) -> List[Dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def losses_by_step(run_dir: str) -> Dict[int, float]:
    return {r["step"]: r["train/lm_loss"] for r in read_metrics(run_dir) if "train/lm_loss" in r}


def load_checkpoint_tensors(directory: str, tmp_path) -> Dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint (model + optimizer), without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(str(tmp_path), f"flat_{abs(hash(directory))}.pt")
    dcp_to_torch_save(directory, out)
    state = torch.load(out, weights_only=False)
    os.remove(out)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def assert_same_tensors(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor],
                        prefix: str = "") -> None:
    keys_a = {k for k in a if k.startswith(prefix)}
    keys_b = {k for k in b if k.startswith(prefix)}
    assert keys_a == keys_b, f"key sets differ: {sorted(keys_a ^ keys_b)[:10]}"
    assert keys_a, f"no tensors with prefix {prefix!r}"
    diff = [k for k in sorted(keys_a) if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:5]}"
