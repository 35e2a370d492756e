from types import SimpleNamespace

import pytest

from msa_train.trainer.schedule import build_plan


def _cfg(warmup, sparse, run="both", gbs=4, seq=256):
    phase = lambda tokens, trainable="all": SimpleNamespace(  # noqa: E731
        tokens=tokens, trainable=trainable, lr=None, min_lr=None, lr_warmup_steps=None)
    stage = SimpleNamespace(run=run, warmup=phase(warmup, "indexer_only"), sparse=phase(sparse))
    train = SimpleNamespace(global_batch_size=gbs, seq_length=seq, lr=1e-3, min_lr=1e-4,
                            lr_warmup_steps=2)
    return stage, train


def test_tokens_round_up_to_whole_steps_and_stages_chain():
    plan = build_plan(*_cfg(warmup=2500, sparse=4096))  # 1024 tokens per step
    warm, sparse = plan.stages
    assert (warm.start_step, warm.steps, warm.mode, warm.trainable) == (0, 3, "dense", "indexer_only")
    assert (sparse.start_step, sparse.steps, sparse.mode) == (3, 4, "sparse")
    assert plan.total_steps == 7 and plan.total_samples == 28
    assert plan.stage_at(2).name == "warmup" and plan.stage_at(3).name == "sparse"
    with pytest.raises(ValueError, match="past the end"):
        plan.stage_at(7)


def test_separate_jobs_see_the_same_boundaries():
    both = build_plan(*_cfg(3072, 3072))
    second = build_plan(*_cfg(3072, 3072, run="sparse"))
    assert [s.name for s in second.job_stages] == ["sparse"]
    assert second.stages == both.stages and second.total_samples == both.total_samples
    assert second.job_stages[0].start_step == 3


def test_zero_warmup_runs_sparse_from_step_zero():
    plan = build_plan(*_cfg(0, 2048))
    assert plan.stage_at(0).name == "sparse"
