"""Which processes of a multi-process run are still there, known in seconds.

JAX's own heartbeat ends every process once one has been silent for train.peer_timeout_s; until then a process whose
peer is gone sits in a collective, and a stop by signal would start a checkpoint save that waits on the dead peer.
So each process also posts a beat, a counter, to the coordinator's key-value store every BEAT_S seconds from a
thread (a process stuck in a collective still beats: JAX releases the GIL while it waits), and a process asked to
stop reads the beats twice, `window_s` apart: a peer whose counter did not move is gone.
"""

from __future__ import annotations

import threading
import time

import jax

BEAT_S = 1.0
_PREFIX = "skymoe_beat/"


def _client():
    from jax._src import distributed  # the coordinator's key-value store; JAX has no public handle to it

    return distributed.global_state.client


class Beats:
    """This process's beat thread (start/stop), and `gone(window_s)`: the peers that stopped beating."""

    def __init__(self, beat_s: float = BEAT_S):
        self.beat_s = beat_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Beats:
        if jax.process_count() > 1:
            self._thread = threading.Thread(target=self._run, name="peer-beats", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        client, key, count = _client(), f"{_PREFIX}{jax.process_index()}", 0
        while not self._stop.is_set():
            count += 1
            try:
                client.key_value_set(key, str(count), allow_overwrite=True)
            except Exception:  # the coordinator is gone: JAX's heartbeat ends this process
                return
            self._stop.wait(self.beat_s)

    def gone(self, window_s: float) -> list[int]:
        """The other processes whose beat did not advance within window_s (at least two beats)."""
        first = _read()
        deadline = time.monotonic() + window_s
        others = [p for p in range(jax.process_count()) if p != jax.process_index()]
        while True:
            now = _read()
            still = [p for p in others if now.get(p) is None or now.get(p) == first.get(p)]
            if not still or time.monotonic() >= deadline:
                return still
            time.sleep(self.beat_s / 4)


def _read() -> dict[int, str]:
    try:
        entries = _client().key_value_dir_get(_PREFIX)
    except Exception:
        return {}
    return {int(key.rsplit("/", 1)[-1]): value for key, value in entries}
