"""kill -9 at seeded random points (inside a step, during a save, at the stage switch), several
times in one run: the finished run's weights, optimizer state and losses equal an uninterrupted
run's bit for bit (CPU)."""

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.trainer.helpers import (SMALL, assert_same_tensors, load_checkpoint_tensors,
                                   losses_by_step)

pytestmark = pytest.mark.slow
SEED = 20  # recorded: the kill delays below are drawn from it
ARGS = [*SMALL, "checkpoint.save_interval=1"]
# One kill per process start: (output line that arms it, max random delay after it in seconds).
KILLS = [
    (r"saved checkpoint .*iter_0000001", 1.0),  # inside step 2 or while saving it
    (r"saved checkpoint .*iter_0000003", 0.05),  # the stage switch (sparse model being built)
    (r"stage sparse: attention=sparse", 0.3),  # first sparse step after a resumed hand-off
    (r"saved checkpoint .*iter_0000004", 0.5),  # inside step 5 or while saving it
]


def _start(run_dir, save):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "msa_train.train", f"run_dir={run_dir}",
           f"checkpoint.save={save}", *ARGS]
    return subprocess.Popen(cmd, cwd=os.getcwd(), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _run_and_kill(run_dir, save, trigger, max_delay, rng):
    """Run until `trigger` is printed, then SIGKILL the process group after a random delay.
    Returns (killed, output)."""
    proc = _start(run_dir, save)
    delay = rng.uniform(0.0, max_delay)
    lines, killed = [], threading.Event()

    def kill_later():
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            killed.set()

    armed = False
    for line in proc.stdout:
        lines.append(line)
        if not armed and re.search(trigger, line):
            armed = True
            threading.Thread(target=kill_later, daemon=True).start()
    proc.wait(timeout=300)
    out = "".join(lines)
    if not killed.is_set():
        assert proc.returncode == 0, out[-4000:]
    return killed.is_set(), out


def test_random_kills_then_resume_equal_uninterrupted_run(tmp_path):
    ref = _start(str(tmp_path / "ref_run"), str(tmp_path / "ref_ckpt"))
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out[-4000:]

    rng = random.Random(SEED)
    run_dir, save = str(tmp_path / "run"), str(tmp_path / "ckpt")
    kills = 0
    for trigger, max_delay in KILLS:
        killed, _ = _run_and_kill(run_dir, save, trigger, max_delay, rng)
        kills += killed
    final = _start(run_dir, save)
    out, _ = final.communicate(timeout=300)
    assert final.returncode == 0, out[-4000:]
    assert kills >= 3, f"only {kills} kills landed"

    assert losses_by_step(run_dir) == losses_by_step(str(tmp_path / "ref_run"))
    last = "iter_0000006"
    assert_same_tensors(load_checkpoint_tensors(os.path.join(str(tmp_path / "ref_ckpt"), last),
                                                tmp_path),
                        load_checkpoint_tensors(os.path.join(save, last), tmp_path))
