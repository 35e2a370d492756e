"""Job lifecycle: stop gracefully before the wall-time limit or on SIGUSR1/SIGTERM, then requeue.

Protocol (trainer side):

    guard = LifecycleGuard.from_config(cfg.cluster).install()    # once, in the main thread
    for step in ...:
        train_step(); guard.note_step_time(step_seconds)
        if guard.should_stop_all(device):                       # all ranks agree (one tiny all-reduce)
            save_checkpoint()
            if rank == 0: write_requeue_request(save_dir, guard.stop_reason, step)
            sys.exit(REQUEUE_EXIT_CODE)

Launcher side (launch/torchrun.sh, launch/slurm/): torchrun reports a failed worker as exit code 1
whatever the worker returned, so the launcher trusts the request file, not only the exit code:
``<save_dir>/requeue_request.json`` present -> the job is requeued (Slurm) or the wrapper exits with
REQUEUE_EXIT_CODE. The launcher deletes a stale request before starting the trainer.

Signals: Slurm's ``--signal=B:USR1@<s>`` reaches the batch shell, which forwards SIGUSR1 to the job
steps; torchrun relays it to the workers when SIGUSR1 is in TORCHELASTIC_SIGNALS_TO_HANDLE and waits
TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds for them (the launch scripts set both). SIGTERM (preemption,
scancel) is handled the same way. Handlers only set a flag: the trainer acts at a step boundary.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from typing import Callable, Dict, Iterable, Optional

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry". Chosen so it
# cannot be confused with Python's 1 (exception), 2 (usage), or 128+N (killed by signal N).
REQUEUE_EXIT_CODE = 75
REQUEUE_REQUEST_FILENAME = "requeue_request.json"
# Absolute UNIX time at which the job is killed; the Slurm scripts export it (from
# SLURM_JOB_END_TIME or squeue). Takes precedence over a relative wall time.
JOB_END_TIME_ENV = "MSA_JOB_END_TIME"

DEFAULT_SIGNALS = ("SIGUSR1", "SIGTERM")


@dataclasses.dataclass
class ClusterConfig:
    """Schema of the ``cluster`` config group (configs/cluster/*.yaml)."""

    name: str = "local"
    gpus_per_node: int = 8
    gpu_memory_gib: Optional[float] = 80.0  # per GPU; the dry run checks its estimate against it
    # Wall-time limit in seconds counted from process start; null = use MSA_JOB_END_TIME / SLURM
    # (or no limit on a workstation).
    walltime_s: Optional[float] = None
    # Seconds kept in reserve before the limit: must cover one step plus a checkpoint save.
    exit_grace_s: float = 600.0
    signals: list = dataclasses.field(default_factory=lambda: list(DEFAULT_SIGNALS))
    # Environment presets for the launcher (NCCL, allocator, ...); exported by launch/ before torchrun.
    env: Dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # Checked at compose/validation time (and so by the dry run), not when the job starts.
        if self.exit_grace_s is None or self.exit_grace_s < 0:
            raise ValueError(f"cluster.exit_grace_s={self.exit_grace_s} must be >= 0 (seconds kept "
                             "for the last step and the save before the wall-time limit)")
        if self.walltime_s is not None and self.walltime_s <= 0:
            raise ValueError(f"cluster.walltime_s={self.walltime_s} must be > 0 or null")
        if self.gpus_per_node < 1:
            raise ValueError(f"cluster.gpus_per_node={self.gpus_per_node} must be >= 1")
        check_signal_names(self.signals)


def check_signal_names(names) -> None:
    """Every entry must be a signal a handler can catch (SIGKILL / SIGSTOP cannot be)."""
    for name in names:
        sig = getattr(signal, str(name), None)
        if not isinstance(sig, signal.Signals):
            raise ValueError(f"cluster.signals: unknown signal {name!r}; use names like "
                             f"{list(DEFAULT_SIGNALS)}")
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"cluster.signals: {name} cannot be caught; use {list(DEFAULT_SIGNALS)}")


def job_end_time_from_env(environ=os.environ) -> Optional[float]:
    for var in (JOB_END_TIME_ENV, "SLURM_JOB_END_TIME"):
        v = environ.get(var)
        if v:
            try:
                return float(v)
            except ValueError:
                raise ValueError(f"{var} must be a UNIX timestamp in seconds, got {v!r}") from None
    return None


class LifecycleGuard:
    def __init__(self, walltime_s: Optional[float] = None, grace_s: float = 600.0, *,
                 job_end_time: Optional[float] = None, signals: Iterable[str] = DEFAULT_SIGNALS,
                 clock: Callable[[], float] = time.time):
        if grace_s < 0:
            raise ValueError(f"cluster.exit_grace_s must be >= 0, got {grace_s}")
        if walltime_s is not None and walltime_s <= 0:
            raise ValueError(f"cluster.walltime_s must be > 0 or null, got {walltime_s}")
        self._clock = clock
        self.grace_s = float(grace_s)
        start = clock()
        if job_end_time is not None:
            self.deadline: Optional[float] = float(job_end_time)
        elif walltime_s is not None:
            self.deadline = start + float(walltime_s)
        else:
            self.deadline = None
        self.signal_names = tuple(signals)
        for name in self.signal_names:
            if not isinstance(getattr(signal, name, None), signal.Signals):
                raise ValueError(f"cluster.signals: unknown signal {name!r}")
        self.received_signal: Optional[str] = None
        self.stop_reason: Optional[str] = None
        self._max_step_s = 0.0
        self._previous: dict = {}

    @classmethod
    def from_config(cls, cluster_cfg=None, environ=os.environ) -> "LifecycleGuard":
        """From the ``cluster`` config (ClusterConfig, DictConfig or plain dict; None = defaults)."""
        def get(key, default):
            if cluster_cfg is None:
                return default
            if isinstance(cluster_cfg, dict):
                return cluster_cfg.get(key, default)
            v = getattr(cluster_cfg, key, default)
            return default if v is None and default is not None else v

        return cls(walltime_s=get("walltime_s", None),
                   grace_s=float(get("exit_grace_s", 600.0)),
                   job_end_time=job_end_time_from_env(environ),
                   signals=list(get("signals", DEFAULT_SIGNALS)))

    # -- signals ---------------------------------------------------------------------------------
    def install(self) -> "LifecycleGuard":
        """Install the flag-setting handlers (main thread only); returns self."""
        for name in self.signal_names:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    @contextlib.contextmanager
    def deferred(self):
        """Hold the stop signals back (pending) while a checkpoint is written.

        Under Slurm the signal reaches every process of the job step, and torchrun signals the
        worker's whole process group: helper processes started during a save (Megatron's
        spawned result-queue manager, its forked writers) would die of a SIGUSR1 they do not
        handle and break the save. A blocked signal mask is inherited across fork and exec, so
        those helpers never see it. This thread gets it once the save is done (another thread
        of this process may take it earlier: the handler only records a flag either way).
        """
        sigs = {getattr(signal, name) for name in self.signal_names}
        if not sigs or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def _on_signal(self, signum, frame) -> None:
        # Only record: saving from inside a handler would race the training step and collectives.
        if self.received_signal is None:
            self.received_signal = signal.Signals(signum).name

    # -- decisions -------------------------------------------------------------------------------
    def note_step_time(self, seconds: float) -> None:
        """Feed step durations so the wall-time check keeps room for one more step."""
        self._max_step_s = max(self._max_step_s, float(seconds))

    def seconds_left(self) -> Optional[float]:
        return None if self.deadline is None else self.deadline - self._clock()

    def should_stop(self) -> bool:
        """Local decision: a stop signal arrived, or the next step + save would not fit the wall time."""
        if self.stop_reason is not None:
            return True
        if self.received_signal is not None:
            self.stop_reason = f"signal:{self.received_signal}"
        else:
            left = self.seconds_left()
            if left is not None and left <= self.grace_s + self._max_step_s:
                self.stop_reason = "walltime"
        return self.stop_reason is not None

    def should_stop_all(self, device=None, group=None) -> bool:
        """should_stop() agreed by all ranks of ``group`` (MAX all-reduce): one rank's signal or
        clock stops everyone at the same step, so the checkpoint is saved collectively."""
        local = self.should_stop()
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return local
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) \
                if dist.get_backend(group) == "nccl" else torch.device("cpu")
        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if flag.item() and self.stop_reason is None:
            self.stop_reason = "peer"
        return bool(flag.item())


# -- the request the launcher reads -----------------------------------------------------------------
def write_requeue_request(save_dir: str, reason: Optional[str], step: int) -> str:
    """Rank 0, after the checkpoint of ``step`` is saved: ask the launcher to requeue the job."""
    os.makedirs(save_dir, exist_ok=True)
    path = os.path.join(save_dir, REQUEUE_REQUEST_FILENAME)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"reason": reason, "step": int(step), "time": time.time(),
                   "exit_code": REQUEUE_EXIT_CODE}, f)
    os.replace(tmp, path)
    return path


def read_requeue_request(save_dir: str) -> Optional[dict]:
    path = os.path.join(save_dir, REQUEUE_REQUEST_FILENAME)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def clear_requeue_request(save_dir: str) -> None:
    try:
        os.remove(os.path.join(save_dir, REQUEUE_REQUEST_FILENAME))
    except FileNotFoundError:
        pass
