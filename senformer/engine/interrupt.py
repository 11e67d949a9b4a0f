"""SIGINT / SIGTERM during training: the first asks the loop to stop after the current step with a
checkpoint; a second exits at once. Checkpoints are written atomically (``checkpoint.py``), so an
immediate exit leaves ``latest`` pointing at a complete one."""
from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager: ``self.signum`` is the first signal received, or None."""

    def __init__(self):
        self.signum, self._old = None, {}

    def _handle(self, signum, _frame):
        if self.signum is not None:
            sys.stderr.write(f"\n{signal.Signals(signum).name} again: exiting now without a new checkpoint\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
        return False


def worker_ignores_stop_signals():
    """For DataLoader workers: Ctrl-C reaches the whole process group, but only the main process may
    decide to stop; and a worker must not outlive a killed parent (Linux: parent-death signal)."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
