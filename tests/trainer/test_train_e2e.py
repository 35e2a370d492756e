"""`msa-train` with the embedded default: both stages, checkpoints, falling loss."""

import json
import os

import pytest

from tests.trainer.helpers import read_metrics, run_train

pytestmark = pytest.mark.slow


def test_default_run_trains_both_stages_and_checkpoints(tmp_path):
    run_dir = str(tmp_path / "run")
    save = str(tmp_path / "ckpt")
    # Only the output locations change: this is the tiny_cpu experiment `msa-train` runs.
    result = run_train([f"checkpoint.save={save}", "logging.plot_at_end=false"], run_dir,
                       timeout=420)
    out = result.stdout
    assert "stage warmup: attention=dense" in out and "stage sparse: attention=sparse" in out

    records = read_metrics(run_dir)
    stages = [r["stage"] for r in records]
    assert stages[0] == "dense" and stages[-1] == "sparse"
    boundary = stages.index("sparse")
    assert all(s == "dense" for s in stages[:boundary]) and all(s == "sparse" for s in stages[boundary:])
    losses = [r["train/lm_loss"] for r in records]
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert last < first - 1.5, f"loss did not fall enough: {first:.3f} -> {last:.3f}"
    assert all("train/indexer_kl" in r for r in records)
    assert any("msa/block_recall" in r for r in records)

    # A checkpoint at the stage boundary and at the end, the tracker naming the last one.
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as fh:
        last_iter = int(fh.read())
    assert last_iter == records[-1]["step"]
    boundary_iter = records[boundary - 1]["step"]
    for it, stage in ((boundary_iter, "warmup"), (last_iter, "sparse")):
        directory = os.path.join(save, f"iter_{it:07d}")
        assert os.path.isfile(os.path.join(directory, "metadata.json"))
        assert os.path.isfile(os.path.join(directory, "run_config.yaml"))
        with open(os.path.join(directory, "msa_train_state.json")) as fh:
            state = json.load(fh)
        assert state["stage"] == stage and state["stage_complete"]
        assert state["progress"]["iteration"] == it
        assert state["consumed_tokens"] == state["data"]["consumed_samples"] * state["data"]["seq_length"]
        assert state["versions"]["megatron_core"]

    # Running it again finds the finished run and does nothing.
    again = run_train([f"checkpoint.save={save}", "logging.plot_at_end=false"], run_dir, timeout=120)
    assert "nothing to do" in again.stdout
