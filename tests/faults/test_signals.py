"""A stop signal during a checkpoint save waits for the save, and helper processes started
during the save (Megatron's spawned writers) never die of it."""

import signal
import subprocess
import sys
import threading
import time

from msa_train.lifecycle import LifecycleGuard


def test_signal_during_save_is_delivered_after_it():
    guard = LifecycleGuard(signals=["SIGUSR1"]).install()
    try:
        with guard.deferred():
            # to the saving thread itself (a process-wide signal may land on another thread,
            # which only sets the same flag)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
            time.sleep(0.05)
            assert guard.received_signal is None  # pending, not lost
        assert guard.received_signal == "SIGUSR1"
        assert guard.should_stop() and guard.stop_reason == "signal:SIGUSR1"
    finally:
        guard.uninstall()


def test_helper_spawned_during_save_survives_the_signal():
    guard = LifecycleGuard(signals=["SIGUSR1"]).install()
    try:
        with guard.deferred():
            # a fresh interpreter (like multiprocessing's spawn) with default signal handling
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
        time.sleep(0.3)
        child.send_signal(signal.SIGUSR1)  # would terminate it with a default disposition
        assert child.wait(timeout=10) == 0
    finally:
        guard.uninstall()
