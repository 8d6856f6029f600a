"""Graceful stop on SIGTERM / SIGINT: the loop finishes its step, saves and exits 0.

A second SIGINT stops at once (KeyboardInterrupt). With several processes the stop
is agreed on collectively, so every process saves at the same step.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopSignals:
    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def requested(self) -> bool:
        """Whether any process was asked to stop (a collective when there are several processes)."""
        local = self.signal_name is not None
        if jax.process_count() == 1:
            return local
        return bool(np.any(multihost_utils.process_allgather(np.array(local))))
