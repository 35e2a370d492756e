"""One job per run: an advisory lock on the save (and run) directory, held for the job's life.

Two trainers on one save directory write the same iter_* directories and prune each other's saves
in flight. Global rank 0 takes an exclusive flock on <dir>/.msa-train.lock before any process
group, model or file of the run exists, and keeps the descriptor open until it exits; the file
holds the owner's host, pid and job id for the refusal message. The kernel drops the lock when
the owner dies (kill -9, OOM, node reboot), so a stale lock is taken over by the next job with a
note, never by guessing from a pid. On shared filesystems flock must reach the server (NFSv4,
Lustre mounted with -o flock, GPFS); see README "When things go wrong".
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from typing import Iterable, List, Optional

LOCK_FILENAME = ".msa-train.lock"
# Distinct from 1 (crash), 2 (bad input), 3 (divergence) and 75 (requeue): another job owns the run.
RUN_LOCKED_EXIT_CODE = 4


class RunLockedError(RuntimeError):
    """Another live msa-train process holds the lock of this run's directory."""


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode("utf-8", "replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def _describe(info: dict) -> str:
    if not info:
        return "an msa-train process (owner unknown)"
    job = f", Slurm job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return (f"msa-train pid {info.get('pid')} on host {info.get('host')} (since "
            f"{info.get('started')}{job})")


class RunLock:
    def __init__(self, directories: Iterable[str]):
        seen: List[str] = []
        for d in directories:
            d = os.path.abspath(str(d))
            if d not in seen:
                seen.append(d)
        self.directories = seen
        self._fds: List[int] = []
        self.took_over: List[str] = []  # messages about stale locks taken over

    def acquire(self) -> "RunLock":
        try:
            for directory in self.directories:
                self._acquire_one(directory)
        except BaseException:
            self.release()
            raise
        return self

    def _acquire_one(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, LOCK_FILENAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"{directory} is in use by {_describe(info)}: wait for that job to finish or "
                f"stop it, or give this job another checkpoint.save / run_dir (lock file {path})"
            ) from None
        previous = _holder(fd)
        if previous:
            # The kernel released the owner's lock, so it is gone (killed, node lost): take over.
            self.took_over.append(f"taking over the lock of {directory} from {_describe(previous)}, "
                                  "which ended without releasing it")
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"),
                  "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fds.append(fd)

    def release(self) -> None:
        """Empty the owner record (a clean exit leaves no stale-lock note) and unlock."""
        for fd in self._fds:
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)  # closing the only descriptor releases the flock
        self._fds.clear()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_for_run(save_dir: Optional[str], run_dir: Optional[str]) -> RunLock:
    """The lock a job takes: its checkpoint directory and its run (metrics) directory."""
    return RunLock([d for d in (save_dir, run_dir) if d])
