"""CPT route: a DENSE GQA checkpoint initializes an MSA model (init_from)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.trainer.helpers import (REPO, SMALL, load_checkpoint_tensors, read_metrics,
                                   run_train)

pytestmark = pytest.mark.slow


def test_dense_checkpoint_converts_to_msa_with_equal_dense_logits(tmp_path):
    # 1. Train a tiny dense GQA model (no MSA layer, so no index branch anywhere).
    dense_save = str(tmp_path / "dense")
    run_train([*SMALL, "attention.dense_first_layers=4", "stage.run=warmup",
               f"checkpoint.save={dense_save}"], str(tmp_path / "dense_run"))

    # 2. Load it into the MSA model: every shared weight loads, the index projections are added.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests/trainer/conversion_check.py"),
                           dense_save], cwd=os.getcwd(), env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["dense_added"] == []
    assert result["added"] and sorted(result["added"]) == result["msa_index_params"]
    assert all(".indexer." in name for name in result["added"])
    assert {name.split(".")[2] for name in result["added"]} == {"1", "2", "3"}  # the MSA layers
    assert result["equal"], f"logits differ in dense mode: max |diff| {result['max_abs_diff']}"

    # 3. The trainer's CPT path: init_from the dense checkpoint, report the added keys, train on.
    run_dir = str(tmp_path / "cpt_run")
    out = run_train([*SMALL, f"checkpoint.init_from={dense_save}", "stage.warmup.trainable=indexer_only",
                     f"checkpoint.save={tmp_path}/cpt"], run_dir).stdout
    assert "added (freshly initialized, not in the checkpoint): 6" in out
    assert "trainable=indexer_only" in out
    # indexer_only warmup: the backbone is bit-for-bit the dense checkpoint's, the index branch
    # moved, and the optimizer holds state for the index parameters only.
    dense_w = load_checkpoint_tensors(os.path.join(dense_save, "iter_0000003"), tmp_path)
    warm = load_checkpoint_tensors(os.path.join(str(tmp_path), "cpt", "iter_0000003"), tmp_path)
    backbone = [k for k in dense_w if not k.startswith("optimizer.")]
    assert backbone and all(torch.equal(dense_w[k], warm[k]) for k in backbone)
    index_keys = [k for k in warm if ".indexer." in k and not k.startswith("optimizer.")]
    assert len(index_keys) == 6
    # The optimizer is stored per parameter (fully reshardable): Adam moments exist for exactly
    # the index parameters.
    moments = sorted(k[len("optimizer.state.exp_avg."):] for k in warm
                     if k.startswith("optimizer.state.exp_avg."))
    assert moments == sorted(index_keys)

    with open(os.path.join(str(tmp_path), "cpt", "latest_checkpointed_iteration.txt")) as fh:
        last = int(fh.read())
    with open(os.path.join(str(tmp_path), "cpt", f"iter_{last:07d}", "msa_train_state.json")) as fh:
        state = json.load(fh)
    assert sorted(state["init_from"]["added"]) == result["msa_index_params"]
    # The dense checkpoint does not end where this job starts: no data position is carried over,
    # the CPT job runs its own 3 + 3 steps from step 0.
    assert last == 6 and state["progress"]["consumed_samples"] == 6 * 4
    assert [r["stage"] for r in read_metrics(run_dir)] == ["dense"] * 3 + ["sparse"] * 3
