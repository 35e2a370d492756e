"""tools/record_selection.py: a checkpoint in the trainer's layout -> a recording that the kernel
bench's `recorded` selection family loads."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.eval.test_msa_eval_cli import BLOCK, MAKE_CKPT, TOPK

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.slow  # a checkpoint and the tool, each in its own process

REPO = Path(__file__).resolve().parents[2]


def _env(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MSA_TRAIN_CACHE=str(tmp_path / "cache"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def test_recording_of_the_last_msa_layer_loads_in_the_bench(tmp_path):
    script = tmp_path / "make.py"
    script.write_text(MAKE_CKPT)  # 3 layers (layers 1 and 2 MSA), 2 groups, Di 16, seq 160
    made = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x * 2\n" * 20)
    out = tmp_path / "recorded.pt"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "record_selection.py"), str(tmp_path / "run"),
                        "--text", str(text), "--seq-len", "128", "-o", str(out)],
                       env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    rec = torch.load(out, weights_only=True)
    assert rec["layer"] == 2 and rec["checkpoint"] == "iter_0000020" and rec["model"] == "eval_test"
    assert (rec["block_size"], rec["topk"]) == (BLOCK, TOPK) and rec["text"] == "text.txt"
    t = 128
    assert rec["q_idx"].shape == (t, 2, 16) and rec["k_idx"].shape == (t, 16)
    assert rec["q_idx"].dtype == torch.float16 and torch.isfinite(rec["q_idx"].float()).all()
    assert rec["q_idx"].float().abs().sum() > 0 and rec["k_idx"].float().abs().sum() > 0
    topk = rec["topk_idx"]
    assert topk.shape == (2, t, TOPK)
    own = torch.arange(t) // BLOCK
    kept = (topk >= 0).sum(-1)
    assert (kept == (own + 1).clamp(max=TOPK)).all()
    assert (topk.gather(-1, (kept - 1).long()[..., None])[..., 0] == own).all()  # own block last

    from msa_kernels.bench.selections import Family, index_vectors, load_recorded

    assert torch.equal(load_recorded(str(out))["k_idx"], rec["k_idx"])
    q, k = index_vectors(Family("recorded", path=str(out)), 256, 2, 16, "cpu")
    assert q.shape == (256, 2, 16) and k.shape == (256, 16)
