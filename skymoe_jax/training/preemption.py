"""Graceful stop on SIGTERM / SIGINT: the loop finishes its step, saves and exits 0.

A second SIGINT stops at once (KeyboardInterrupt). With several processes the stop
is agreed on collectively, so every process saves at the same step. That collective
waits for the devices to finish the queued step, which would end the overlap of the
host's next batch with the device's step, so it runs only every `every` steps (the
same steps on every process); a single process checks its flag every step for free.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopSignals:
    def __init__(self, every: int = 1):
        self.signal_name: str | None = None
        self.every = every
        self._previous = {}

    def __enter__(self) -> StopSignals:
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

    def requested(self, step: int) -> bool:
        """Whether any process was asked to stop (with several processes: known at multiples of `every`)."""
        local = self.signal_name is not None
        if jax.process_count() == 1:
            return local
        if step % self.every:
            return False
        return bool(np.any(multihost_utils.process_allgather(np.array(local))))
