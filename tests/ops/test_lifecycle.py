"""Graceful stop: signal and wall-time decisions, and the real chain
launch/torchrun.sh -> torchrun -> workers (SIGUSR1) -> save + requeue request -> exit code 75."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from msa_train.lifecycle import (REQUEUE_EXIT_CODE, LifecycleGuard, clear_requeue_request,
                                 job_end_time_from_env, read_requeue_request,
                                 write_requeue_request)

REPO = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t


def test_walltime_keeps_room_for_a_step_and_the_save():
    clock = Clock(1000.0)
    g = LifecycleGuard(walltime_s=3600, grace_s=300, clock=clock)
    clock.t += 3000
    assert not g.should_stop()
    g.note_step_time(350)  # 600 s left < 300 s grace + one 350 s step
    assert g.should_stop() and g.stop_reason == "walltime"


def test_job_end_time_from_env_wins_and_validates():
    clock = Clock(0.0)
    g = LifecycleGuard.from_config({"walltime_s": 10_000, "exit_grace_s": 60},
                                   environ={"SLURM_JOB_END_TIME": "100"})
    assert g.deadline == 100.0
    assert job_end_time_from_env({"MSA_JOB_END_TIME": "5", "SLURM_JOB_END_TIME": "9"}) == 5.0
    with pytest.raises(ValueError, match="MSA_JOB_END_TIME"):
        job_end_time_from_env({"MSA_JOB_END_TIME": "tomorrow"})
    with pytest.raises(ValueError, match="exit_grace_s"):
        LifecycleGuard(grace_s=-1, clock=clock)
    with pytest.raises(ValueError, match="cluster.signals"):
        LifecycleGuard(signals=["SIGNOPE"])
    assert not LifecycleGuard(clock=clock).should_stop()  # no limit, no signal


def test_signal_sets_flag_only():
    g = LifecycleGuard(signals=["SIGUSR1"]).install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(100):
            if g.received_signal:
                break
            time.sleep(0.01)
        assert g.should_stop() and g.stop_reason == "signal:SIGUSR1"
        assert g.should_stop_all()  # no process group: the local decision
    finally:
        g.uninstall()


def test_requeue_request_roundtrip(tmp_path):
    assert read_requeue_request(str(tmp_path)) is None
    write_requeue_request(str(tmp_path), "signal:SIGUSR1", 120)
    req = read_requeue_request(str(tmp_path))
    assert req["step"] == 120 and req["exit_code"] == REQUEUE_EXIT_CODE
    clear_requeue_request(str(tmp_path))
    clear_requeue_request(str(tmp_path))  # idempotent
    assert read_requeue_request(str(tmp_path)) is None


FAKE_TRAINER = textwrap.dedent("""
    import os, sys, time
    import torch.distributed as dist
    from msa_train.lifecycle import LifecycleGuard, REQUEUE_EXIT_CODE, write_requeue_request
    save = sys.argv[1].split("=", 1)[1]
    guard = LifecycleGuard.from_config({"exit_grace_s": 0}).install()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with open(os.path.join(save, f"ready{rank}"), "w") as f:
        f.write(str(os.getpid()))
    step = 0
    while True:
        time.sleep(0.05)
        step += 1
        if guard.should_stop_all():
            break
    dist.barrier()
    if rank == 0:
        write_requeue_request(save, guard.stop_reason, step)
    open(os.path.join(save, f"stopped{rank}_{guard.stop_reason}"), "w").close()
    dist.destroy_process_group()
    sys.exit(REQUEUE_EXIT_CODE)
""")


@pytest.mark.slow
def test_usr1_through_torchrun_requeues(tmp_path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    save = tmp_path / "save"
    save.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MSA_", "TORCHELASTIC"))}
    env.update(NPROC="2", MSA_ENTRY=str(script), OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    p = subprocess.Popen(["bash", str(REPO / "launch/torchrun.sh"), f"checkpoint.save={save}"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        deadline = time.time() + 60
        while not all((save / f"ready{r}").exists() for r in (0, 1)):
            assert p.poll() is None, p.communicate()[0]
            assert time.time() < deadline, "workers did not start"
            time.sleep(0.1)
        p.send_signal(signal.SIGUSR1)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        # torchrun starts workers in their own sessions: end any this test left behind.
        for ready in save.glob("ready*"):
            try:
                os.kill(int(ready.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    assert p.returncode == REQUEUE_EXIT_CODE, out
    stopped = sorted(f.name for f in save.glob("stopped*"))
    # Both workers got the signal from torchrun (or agreed with the peer that got it).
    assert len(stopped) == 2 and any("signal:SIGUSR1" in s for s in stopped), stopped
    assert read_requeue_request(str(save))["reason"].startswith(("signal:", "peer"))
