"""End to end on the tiny CPU model: divergence policy, shape change on resume, damaged shard."""

import glob
import os

import pytest

from tests.trainer.helpers import SMALL, losses_by_step, read_metrics, run_train

pytestmark = pytest.mark.slow


def _iters(save):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(str(save), "iter_*")))


def test_divergence_skips_updates_then_stops_with_exit_3_without_saving(tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    stale = save / "requeue_request.json"  # left by an earlier job: cleared when this one starts
    stale.write_text('{"reason": "signal:SIGUSR1", "step": 0}')
    out = run_train([*SMALL, f"checkpoint.save={save}", "train.lr=1e6", "train.lr_warmup_steps=0",
                     "checkpoint.save_interval=1", "train.max_skipped_steps=2"],
                    str(tmp_path / "run"), expect_rc=3)
    assert "non-finite gradient norm" in out.stdout and "update skipped" in out.stdout
    assert "training diverged: 2 steps in a row" in out.stdout
    assert "Traceback" not in out.stdout
    assert not stale.exists()
    # The skipped steps left the weights as they were: the last save is the last applied update
    # (or one of the skipped steps after it, which hold the same state); no later step saved.
    last = int(open(save / "latest_checkpointed_iteration.txt").read())
    logged = {r["step"] for r in read_metrics(str(tmp_path / "run"))}
    assert last < max(logged) + 1 and f"iter_{last:07d}" in _iters(save)


def test_resume_with_another_model_exits_2_and_keeps_the_checkpoint(tmp_path):
    save = tmp_path / "ckpt"
    run_train([*SMALL, f"checkpoint.save={save}", "train.max_steps_per_job=1",
               "checkpoint.keep_last_k=1"], str(tmp_path / "run"))
    before = _iters(save)
    out = run_train([*SMALL, f"checkpoint.save={save}", "model.num_layers=2",
                     "checkpoint.keep_last_k=1"], str(tmp_path / "run"), expect_rc=2)
    assert "model.num_layers: checkpoint 4, this config 2" in out.stdout
    assert _iters(save) == before == ["iter_0000001"]


def test_damaged_shard_falls_back_to_previous_iteration_and_resumes_exactly(tmp_path):
    save = tmp_path / "ckpt"
    args = [*SMALL, f"checkpoint.save={save}", "checkpoint.save_interval=1"]
    run_train([*args, "train.max_steps_per_job=2"], str(tmp_path / "run"))
    shard = sorted(glob.glob(str(save / "iter_0000002" / "*.distcp")))[0]
    with open(shard, "r+b") as f:  # 16 bytes overwritten inside the shard
        f.seek(os.path.getsize(shard) // 2)
        f.write(b"\xff" * 16)
    out = run_train(args, str(tmp_path / "run2"))
    assert "CHECKPOINT DAMAGED" in out.stdout and shard in out.stdout
    assert "resume:" in out.stdout and "iter_0000001 (step 1" in out.stdout
    assert glob.glob(str(save / "iter_0000002.replaced-*"))  # kept aside, not deleted
    ref = run_train([*SMALL, f"checkpoint.save={tmp_path}/ref"], str(tmp_path / "ref"))
    assert ref.returncode == 0
    resumed = losses_by_step(str(tmp_path / "run2"))
    expected = losses_by_step(str(tmp_path / "ref"))
    assert resumed == {k: v for k, v in expected.items() if k >= 2}


def test_rollback_reloads_the_last_checkpoint_and_moves_the_data_on(tmp_path):
    save = tmp_path / "ckpt"
    # The warmup stage trains normally; the sparse stage's first update (lr 1e6) blows the
    # weights up, so the next steps' gradients are non-finite.
    out = run_train([*SMALL, f"checkpoint.save={save}", "stage.sparse.lr=1e6",
                     "stage.sparse.lr_warmup_steps=0", "checkpoint.save_interval=1",
                     "train.max_skipped_steps=1", "train.rollback_on_divergence=true",
                     "train.max_rollbacks=1"], str(tmp_path / "run"), expect_rc=3)
    assert "ROLLBACK 1/1" in out.stdout and "reloaded" in out.stdout
    assert "skip the" in out.stdout and "samples read since it" in out.stdout
    assert "1 rollbacks" in out.stdout and "Traceback" not in out.stdout
