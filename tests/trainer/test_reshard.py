"""Full-state resume at another parallel layout (TP / PP / EP / world size) continues the saving
run's loss curve (fp32 on CPU: within 1e-5 relative; in practice bitwise)."""

import os
import subprocess
import sys

import pytest

from tests.trainer.helpers import SMALL, losses_by_step, run_train

pytestmark = pytest.mark.slow
SAVE_STEP = 4  # mid sparse stage (SMALL: 3 warmup + 3 sparse steps)
TOTAL = 6
REL_TOL = 1e-5

LAYOUTS = {
    "single": ([], 1),
    "tp2": (["parallel.tp=2", "parallel.sequence_parallel=true"], 2),
    "pp2": (["parallel.pp=2"], 2),
    "ep2": (["parallel.ep=2"], 2),  # DP2 x EP2: a chained (dense + expert) optimizer
    # The issue-6 pair, 4 ranks, 1 sample per micro-batch (PP2 x DP2 needs >= 2 micro-batches).
    # Divisors keep the padded vocabulary (divisor x TP) at 256 on both sides.
    "tp2cp2": (["parallel.tp=2", "parallel.cp=2", "parallel.sequence_parallel=true",
                "train.micro_batch_size=1"], 4),
    "pp2ep2": (["parallel.pp=2", "parallel.ep=2", "train.micro_batch_size=1",
                "data.tokenizer.make_vocab_size_divisible_by=256"], 4),
}


def _source(root, layout: str, extra=()):
    """Train `layout` to the end, saving full state at SAVE_STEP; returns (ckpt dir, losses)."""
    args, nproc = LAYOUTS[layout]
    run_train([*SMALL, *args, *extra, f"checkpoint.save={root}/ckpt",
               f"checkpoint.save_interval={SAVE_STEP}", "checkpoint.save_at_stage_end=false"],
              str(root / "run"), nproc=nproc)
    ckpt = os.path.join(str(root), "ckpt", f"iter_{SAVE_STEP:07d}")
    return ckpt, losses_by_step(str(root / "run"))


def _resume(ckpt: str, root, layout: str, expect_rc=0, extra=()):
    args, nproc = LAYOUTS[layout]
    result = run_train([*SMALL, *args, *extra, f"checkpoint.load={ckpt}", "checkpoint.save=null"],
                       str(root / "run"), nproc=nproc, expect_rc=expect_rc)
    return result, (losses_by_step(str(root / "run")) if result.returncode == 0 else None)


def _assert_continues(resumed, source):
    expected = {step: loss for step, loss in source.items() if step > SAVE_STEP}
    assert sorted(resumed) == sorted(expected) == list(range(SAVE_STEP + 1, TOTAL + 1)), resumed
    for step, loss in expected.items():
        assert abs(resumed[step] - loss) <= REL_TOL * abs(loss), (step, resumed[step], loss)


@pytest.fixture(scope="module")
def ep2_source(tmp_path_factory):
    return _source(tmp_path_factory.mktemp("ep2_source"), "ep2")


@pytest.mark.parametrize("target", ["single", "pp2"])
def test_chained_expert_optimizer_resumes_without_ep(ep2_source, target, tmp_path):
    # EP2 -> EP1: the checkpoint holds two sub-optimizers (dense, expert), the job builds one.
    ckpt, source = ep2_source
    result, resumed = _resume(ckpt, tmp_path, target)
    assert f"resume: {ckpt} (step {SAVE_STEP}" in result.stdout
    _assert_continues(resumed, source)


def test_single_optimizer_resumes_with_ep(tmp_path):
    # EP1 -> EP2 (and 1 -> 2 ranks): one saved sub-optimizer feeds the dense and expert ones.
    ckpt, source = _source(tmp_path / "src", "single")
    _, resumed = _resume(ckpt, tmp_path / "dst", "ep2")
    _assert_continues(resumed, source)


def test_tp2_to_pp2_keeps_the_padded_vocabulary(tmp_path):
    # The padded vocabulary is a multiple of make_vocab_size_divisible_by x TP (128 x 2 here):
    # at TP1 the same size needs divisor 256. A different size would change the softmax over
    # the padded logits (Megatron loads the embedding anyway), so the resume must refuse it.
    ckpt, source = _source(tmp_path / "src", "tp2")
    refused, _ = _resume(ckpt, tmp_path / "refused", "pp2", expect_rc=None)
    assert refused.returncode != 0
    assert "data.tokenizer.make_vocab_size_divisible_by" in refused.stdout
    assert "embedding.word_embeddings.weight" in refused.stdout
    _, resumed = _resume(ckpt, tmp_path / "dst", "pp2",
                         extra=["data.tokenizer.make_vocab_size_divisible_by=256"])
    _assert_continues(resumed, source)


def test_tp2xcp2_to_pp2xep2(tmp_path):
    # Every dimension changes at once: TP, CP and PP, EP 1 -> 2 (single -> chained optimizer), DP.
    ckpt, source = _source(tmp_path / "src", "tp2cp2")
    _, resumed = _resume(ckpt, tmp_path / "dst", "pp2ep2")
    _assert_continues(resumed, source)


_LEGACY_WRITER = """
import sys
from msa_train.trainer import checkpointing, optimizer_state
# What msa-train saved before the reshardable format: dp_reshardable, no format entry.
checkpointing.OPTIMIZER_METADATA = dict(optimizer_state.LEGACY_METADATA)
checkpointing.FORMAT_KEY = "unused_by_the_old_writer"
from msa_train.train import main
main()
"""


def test_legacy_dp_reshardable_checkpoint_resumes_at_its_layout(tmp_path):
    run_dir, save = str(tmp_path / "src" / "run"), str(tmp_path / "src" / "ckpt")
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-c", _LEGACY_WRITER, f"run_dir={run_dir}", *SMALL,
         f"checkpoint.save={save}", f"checkpoint.save_interval={SAVE_STEP}",
         "checkpoint.save_at_stage_end=false"],
        cwd=os.getcwd(), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = os.path.join(save, f"iter_{SAVE_STEP:07d}")
    _, resumed = _resume(ckpt, tmp_path / "same", "single")
    assert resumed == {s: v for s, v in losses_by_step(run_dir).items() if s > SAVE_STEP}
    # At another layout the old format cannot load: a clear error, not a shape mismatch.
    result, _ = _resume(ckpt, tmp_path / "other", "pp2", expect_rc=None)
    assert result.returncode != 0
    assert "old dp_reshardable format" in result.stdout and "parallel." in result.stdout


def test_param_groups_pair_across_expert_parallel_flag():
    pytest.importorskip("megatron.core")
    from msa_train.trainer.ckpt_layout import CheckpointError
    from msa_train.trainer.optimizer_state import match_param_groups

    keys = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")
    saved = [  # an EP2 checkpoint: dense groups, then the expert optimizer's group
        {"wd_mult": 1.0, "lr_mult": 1.0, "is_expert_parallel": False, "is_decoupled_lr": False,
         "lr": 1e-3, "step": 4},
        {"wd_mult": 0.0, "lr_mult": 1.0, "is_expert_parallel": False, "is_decoupled_lr": False,
         "lr": 1e-3, "step": 4},
        {"wd_mult": 1.0, "lr_mult": 1.0, "is_expert_parallel": True, "is_decoupled_lr": False,
         "lr": 2e-3, "step": 4},
    ]
    expert = {"params": [], "wd_mult": 1.0, "lr_mult": 1.0, "is_expert_parallel": True,
              "is_decoupled_lr": False}
    assert match_param_groups([expert], saved, keys)[0]["lr"] == 2e-3  # exact match preferred
    # EP1: the experts sit in a dense group; it takes a same-settings group, relabeled as its own.
    dense = dict(expert, is_expert_parallel=False)
    got = match_param_groups([dense], saved[2:], keys)[0]
    assert got == dict(saved[2], is_expert_parallel=False)
    # Same flags elsewhere win over the relaxed match: the dense wd group of the checkpoint.
    assert match_param_groups([dense], saved, keys)[0] is not saved[0]  # a relabeled copy
    assert match_param_groups([dense], saved, keys)[0] == saved[0]
    with pytest.raises(CheckpointError, match="no param group"):
        match_param_groups([dict(dense, wd_mult=0.0)], saved[2:], keys)  # no wd_mult 0 saved
