"""One job per run: the save/run directory lock names its owner and survives kill -9 safely."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from msa_train.trainer.run_lock import LOCK_FILENAME, RunLock, RunLockedError, lock_for_run


def test_second_job_is_refused_naming_host_and_pid(tmp_path):
    with lock_for_run(str(tmp_path / "ckpt"), str(tmp_path / "run")):
        with pytest.raises(RunLockedError) as err:
            RunLock([str(tmp_path / "ckpt")]).acquire()
        msg = str(err.value)
        assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg
        assert str(tmp_path / "ckpt") in msg
        # the run directory alone is locked too (metrics.jsonl would interleave)
        with pytest.raises(RunLockedError):
            RunLock([str(tmp_path / "run")]).acquire()
    # released at exit: the next job takes it without a stale-lock note
    lock = RunLock([str(tmp_path / "ckpt")]).acquire()
    assert lock.took_over == []
    lock.release()


def test_failed_acquire_releases_what_it_took(tmp_path):
    held = RunLock([str(tmp_path / "run")]).acquire()
    with pytest.raises(RunLockedError):
        RunLock([str(tmp_path / "ckpt"), str(tmp_path / "run")]).acquire()
    RunLock([str(tmp_path / "ckpt")]).acquire().release()  # not left locked by the failed try
    held.release()


def test_stale_lock_after_kill_9_is_taken_over(tmp_path):
    code = ("import os, signal, sys; from msa_train.trainer.run_lock import RunLock; "
            f"RunLock([{str(tmp_path)!r}]).acquire(); print(os.getpid(), flush=True); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL
    dead_pid = int(proc.stdout.split()[0])
    assert f'"pid": {dead_pid}' in (tmp_path / LOCK_FILENAME).read_text()
    lock = RunLock([str(tmp_path)]).acquire()
    assert len(lock.took_over) == 1 and f"pid {dead_pid}" in lock.took_over[0]
    assert f'"pid": {os.getpid()}' in (tmp_path / LOCK_FILENAME).read_text()
    lock.release()


def test_msa_train_on_a_locked_run_exits_4_and_writes_nothing(tmp_path):
    from tests.trainer.helpers import SMALL, run_train

    save = tmp_path / "ckpt"
    with lock_for_run(str(save), None):
        out = run_train([*SMALL, f"checkpoint.save={save}"], str(tmp_path / "run"), expect_rc=4)
    assert f"pid {os.getpid()}" in out.stdout and "in use by msa-train" in out.stdout
    assert sorted(os.listdir(save)) == [LOCK_FILENAME]
