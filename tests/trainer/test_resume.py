"""Resume and stage hand-off are bitwise exact on CPU (losses, weights and optimizer state)."""

import os

import pytest

from tests.trainer.helpers import (SMALL, assert_same_tensors, load_checkpoint_tensors,
                                   losses_by_step, read_metrics, run_train)

pytestmark = pytest.mark.slow
TOTAL = 6  # 3 warmup + 3 sparse steps (SMALL)


@pytest.fixture(scope="module")
def continuous(tmp_path_factory):
    root = tmp_path_factory.mktemp("continuous")
    run_train([*SMALL, f"checkpoint.save={root}/ckpt"], str(root / "run"))
    return root


def _final(root, it=TOTAL):
    return os.path.join(str(root), "ckpt", f"iter_{it:07d}")


def test_stop_and_resume_equals_continuous(continuous, tmp_path):
    save = f"checkpoint.save={tmp_path}/ckpt"
    run_dir = str(tmp_path / "run")
    # Stop exactly at the stage boundary (k=3), then mid-sparse (5), then finish. (Mid-warmup
    # stops are covered by the wall-time test below.)
    first = run_train([*SMALL, save, "train.max_steps_per_job=3"], run_dir)
    assert "stopping after 3 steps" in first.stdout
    second = run_train([*SMALL, save, "train.max_steps_per_job=2"], run_dir)
    assert "resume:" in second.stdout and "step 3" in second.stdout
    assert "stage sparse: attention=sparse" in second.stdout
    assert "stage warmup: attention" not in second.stdout
    third = run_train([*SMALL, save], run_dir)
    assert "resume:" in third.stdout and "step 5" in third.stdout

    expected = losses_by_step(str(continuous / "run"))
    got = losses_by_step(run_dir)
    assert sorted(got) == sorted(expected) == list(range(1, TOTAL + 1))
    assert got == expected, (got, expected)  # bitwise: float equality of every logged loss
    assert_same_tensors(load_checkpoint_tensors(_final(continuous), tmp_path),
                        load_checkpoint_tensors(_final(tmp_path), tmp_path))


def test_stage_two_as_separate_job_equals_continuous(continuous, tmp_path):
    run_dir = str(tmp_path / "run")
    run_train([*SMALL, "stage.run=warmup", f"checkpoint.save={tmp_path}/stage1"], run_dir)
    second = run_train([*SMALL, "stage.run=sparse", f"checkpoint.init_from={tmp_path}/stage1",
                        f"checkpoint.save={tmp_path}/stage2"], run_dir)
    assert "init_from" in second.stdout and "added" not in second.stdout

    expected = losses_by_step(str(continuous / "run"))
    assert losses_by_step(run_dir) == expected
    split = load_checkpoint_tensors(os.path.join(str(tmp_path), "stage2", f"iter_{TOTAL:07d}"), tmp_path)
    whole = load_checkpoint_tensors(_final(continuous), tmp_path)
    # Weights and the sparse stage's optimizer state: each stage starts a fresh optimizer.
    assert_same_tensors(whole, split)


def test_walltime_stop_saves_requests_requeue_and_resumes_exactly(continuous, tmp_path):
    from msa_train.lifecycle import REQUEUE_EXIT_CODE, read_requeue_request

    # Validation passes on top (every 2 steps) must not perturb training.
    save = f"checkpoint.save={tmp_path}/ckpt"
    evals = "train.eval_interval=2"
    run_dir = str(tmp_path / "run")
    # A wall time that is over after the first step: save, ask for a requeue, exit with its code.
    stopped = run_train([*SMALL, save, evals, "cluster.walltime_s=0.01", "cluster.exit_grace_s=0"],
                        run_dir, expect_rc=REQUEUE_EXIT_CODE)
    assert "asks the launcher to requeue" in stopped.stdout
    assert read_requeue_request(str(tmp_path / "ckpt")) is not None
    with open(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt") as fh:
        assert int(fh.read()) == 1
    run_train([*SMALL, save, evals], run_dir)
    assert losses_by_step(run_dir) == losses_by_step(str(continuous / "run"))
    valid = {r["step"]: r["valid/lm_loss"] for r in read_metrics(run_dir) if "valid/lm_loss" in r}
    assert sorted(valid) == [2, 4, 6] and valid[6] < valid[2]


def test_two_ranks_with_distributed_optimizer_resume_exactly(tmp_path):
    runs = {}
    for name, stops in (("continuous", [None]), ("resumed", [4, None])):
        run_dir = str(tmp_path / name / "run")
        for stop in stops:
            extra = [] if stop is None else [f"train.max_steps_per_job={stop}"]
            run_train([*SMALL, f"checkpoint.save={tmp_path}/{name}/ckpt", *extra], run_dir, nproc=2)
        runs[name] = run_dir
    assert losses_by_step(runs["resumed"]) == losses_by_step(runs["continuous"])
    assert_same_tensors(load_checkpoint_tensors(_final(tmp_path / "continuous"), tmp_path),
                        load_checkpoint_tensors(_final(tmp_path / "resumed"), tmp_path))


def test_non_moe_model_mixing_msa_and_full_layers_saves_and_resumes_exactly(tmp_path):
    """Without MoE, Megatron stacks layers under one checkpoint key unless told the layers differ;
    MSA layers carry index weights that full-attention layers lack, so that save used to fail."""
    dense_ffn = [*SMALL, "model.num_moe_experts=null"]
    ref = tmp_path / "ref"
    run_train([*dense_ffn, f"checkpoint.save={ref}/ckpt"], str(ref / "run"))
    save = f"checkpoint.save={tmp_path}/ckpt"
    run_dir = str(tmp_path / "run")
    run_train([*dense_ffn, save, "train.max_steps_per_job=4"], run_dir)
    resumed = run_train([*dense_ffn, save], run_dir)
    assert "resume:" in resumed.stdout and "step 4" in resumed.stdout
    assert losses_by_step(run_dir) == losses_by_step(str(ref / "run"))
    assert_same_tensors(load_checkpoint_tensors(_final(ref), tmp_path),
                        load_checkpoint_tensors(_final(tmp_path), tmp_path))
