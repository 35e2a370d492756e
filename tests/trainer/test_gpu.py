"""GPU (bf16, Triton kernels): the default recipe trains and resumes bitwise with deterministic
kernels. Verified on an H200 through the device tool (see the trainer report); skipped without CUDA."""

import pytest

from tests.trainer.helpers import losses_by_step, run_train

pytestmark = pytest.mark.gpu

# The sparse-attention backward accumulates with atomics unless attention.deterministic=true.
GPU = ["train.device=cuda", "attention.deterministic=true", "logging.plot_at_end=false",
       "logging.log_interval=5"]


def test_bf16_default_recipe_resumes_bitwise(tmp_path):
    run_train([*GPU, f"checkpoint.save={tmp_path}/a/ckpt"], str(tmp_path / "a"))
    for stop in (["train.max_steps_per_job=30"], []):  # stop inside the sparse stage
        run_train([*GPU, f"checkpoint.save={tmp_path}/b/ckpt", *stop], str(tmp_path / "b"))
    continuous, resumed = losses_by_step(str(tmp_path / "a")), losses_by_step(str(tmp_path / "b"))
    assert sorted(continuous) == sorted(resumed) and continuous == resumed
    assert continuous[max(continuous)] < continuous[min(continuous)] - 1.5
