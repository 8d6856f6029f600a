"""Graceful stop on SIGTERM / SIGINT: the loop finishes its step, saves and exits 0.

A second SIGINT stops at once (KeyboardInterrupt). With several processes the stop
is agreed on collectively, so every process saves at the same step. That collective
waits for the devices to finish the queued step, which would end the overlap of the
host's next batch with the device's step, so it runs only every `every` steps (the
same steps on every process); a single process checks its flag every step for free.

With several processes a stop can also find a peer gone (its host died, the launcher
killed it): the save would wait on it until JAX's heartbeat ends the run, and the
loop itself may sit in a collective with it, where no Python signal handler runs. So
a thread wakes on each signal (Python's wakeup fd), asks the peers' beats
(parallel/peers.py) which processes are gone, and if any are, hands them to
`on_peers_gone`, which ends the process without saving.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from skymoe_jax.parallel.peers import Beats

PEER_WINDOW_S = 5.0  # a peer whose beat did not move for this long, when a stop comes, is gone


class StopSignals:
    def __init__(self, every: int = 1, on_peers_gone: Callable[[str, list[int]], None] | None = None):
        self.signal_name: str | None = None
        self.every = every
        self.on_peers_gone = on_peers_gone
        self._previous = {}
        self._beats: Beats | None = None
        self._wakeup: tuple[int, int] | None = None
        self._previous_wakeup = -1

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
            if jax.process_count() > 1 and self.on_peers_gone is not None:
                self._watch_peers()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            os.write(self._wakeup[1], b"\0")  # ends the watcher
            self._watcher.join()
            for fd in self._wakeup:
                os.close(fd)
            self._beats.stop()

    def _watch_peers(self) -> None:
        self._beats = Beats().start()
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._wakeup = (read, write)
        self._previous_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, name="stop-watcher", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while True:
            signum = os.read(self._wakeup[0], 1)[0]
            if signum == 0:
                return
            if signum in (signal.SIGTERM, signal.SIGINT):
                gone = self._beats.gone(PEER_WINDOW_S)
                if gone:
                    self.on_peers_gone(signal.Signals(signum).name, gone)

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
