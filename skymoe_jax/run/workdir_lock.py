"""One live writer per workdir: `skymoe train` holds WORKDIR/skymoe.lock for the whole run.

The lock is a file created with O_CREAT | O_EXCL, which is atomic on local disks and on the NFS (v3 and later)
and Lustre mounts clusters share, rather than flock or fcntl, whose locks on those filesystems hang on the lock
daemon and the mount options, and survive a node that died. The file names its holder (host, pid, start time)
and a random token, and the holder renews its modification time from a thread every RENEW_S seconds.

A lock is stale, and the next run takes it over and says so, when its holder ran on this host and that process
is gone (a SIGKILL, an OOM kill, an abort), or when it was not renewed for STALE_S seconds (a host that died or was
cut off). A lock held on another host is watched until it is renewed (its run is alive: refused, within RENEW_S) or
goes stale (taken over, within STALE_S), so a group relaunched on other nodes after a crash waits for the lock
instead of failing. Ages are read against a file written just then in the same directory, so the file server's
clock is compared with itself, not with this host's. Taking over renames the stale file away (one rename wins) and
checks that what it moved was the stale lock; a holder that finds another token in the file when it renews has
lost the lock, and the run stops before it writes again (`check`).

On object storage (an `s3://` or `gs://` workdir) the same protocol runs on objects (checkpoint/storage.py): the lock
is created with a conditional write (If-None-Match: *), renewed by writing it again, and aged by last-modified times
against a probe object, by the store's clock. There is no rename: a run taking over first creates a claim object named
after the stale lock's token, with the same conditional write, so one run alone replaces a given stale lock.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import jax
import numpy as np
from jax.experimental import multihost_utils

from skymoe_jax.checkpoint import storage
from skymoe_jax.errors import RunFailure, WorkdirError

LOCK_NAME = "skymoe.lock"
RENEW_S = 5.0
STALE_S = 30.0


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str  # ISO time, UTC
    token: str
    proc_start: str = ""  # the process's start tick on Linux: a reused pid is another process

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"

    @staticmethod
    def read(path: str) -> Holder | None:
        """The holder written in path, or None if it is gone or not a lock this code wrote."""
        try:
            return Holder(**json.loads(storage.read_bytes(path)))
        except (OSError, ValueError, TypeError):
            return None


def _proc_start(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive_here(holder: Holder) -> bool:
    """Whether the holder's process (on this host) still runs."""
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return not holder.proc_start or _proc_start(holder.pid) in ("", holder.proc_start)


def _age_s(directory: str, path: str) -> float:
    """Seconds since path was last renewed, by the clock of the filesystem that holds it."""
    probe = storage.join(directory, f".{LOCK_NAME}.probe-{secrets.token_hex(4)}")
    storage.write_bytes(probe, b"")
    try:
        return storage.modified(probe) - storage.modified(path)
    finally:
        storage.remove(probe)


class WorkdirLock:
    """Hold a workdir's lock: `acquire()` or WorkdirError naming the live holder; `check()` in the loop;
    `release()` at the end (a context manager does both)."""

    def __init__(self, workdir: str, *, renew_s: float = RENEW_S, stale_s: float = STALE_S):
        self.directory = storage.absolute(workdir)
        self.path = storage.join(self.directory, LOCK_NAME)
        self.renew_s, self.stale_s = renew_s, stale_s
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        self.holder = Holder(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=now.isoformat(),
            token=secrets.token_hex(8),
            proc_start=_proc_start(os.getpid()),
        )
        self.took_over: str | None = None  # what was taken over, for the run's log
        self._lost: str | None = None  # who holds the lock now, once this run lost it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._claims: list[str] = []  # on object storage, the claims of the stale locks this run took over

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        storage.makedirs(self.directory)
        for _ in range(40):  # a lock being written, released or taken over just now: look again
            if self._create():
                self._thread = threading.Thread(target=self._renew, name="workdir-lock", daemon=True)
                self._thread.start()
                return
            other = Holder.read(self.path)
            if other is None:
                time.sleep(0.05)
                continue
            why = self._stale(other)
            if why is None:
                raise WorkdirError(
                    f"{self.directory} is in use by another run ({other.describe()}); wait for it to end, "
                    f"stop it, or train in another --workdir"
                )
            self._take_over(other, why)
        raise WorkdirError(
            f"{self.path} is not a lock a run holds now (unreadable, or other runs keep taking it); if no run "
            "trains in this workdir, remove the file and start again"
        )

    def _create(self) -> bool:
        return storage.create(self.path, json.dumps(self.holder.__dict__).encode())

    def _stale(self, other: Holder) -> str | None:
        """Why other's lock is stale, or None when its run is alive; waits up to STALE_S on another host's lock."""
        if other.host == self.holder.host:
            return None if _alive_here(other) else "its process is gone"
        said = False
        try:
            renewed = storage.modified(self.path)
            while True:
                age = _age_s(self.directory, self.path)
                if age > self.stale_s:
                    return f"it was not renewed for {age:.0f} s"
                if storage.modified(self.path) != renewed:
                    return None
                if not said:
                    print(
                        f"waiting up to {self.stale_s - age:.0f} s for the workdir lock of {other.describe()}: it is "
                        "taken over unless its run renews it",
                        flush=True,
                    )
                    said = True
                time.sleep(min(1.0, self.renew_s / 4))
        except FileNotFoundError:
            return "it was released"

    def _take_over(self, other: Holder, why: str) -> None:
        if storage.is_url(self.path):
            # The claim is the conditional write only one run wins; the lock read again is still the stale one.
            claim = f"{self.path}.claim-{other.token}"
            if not storage.create(claim, self.holder.token.encode()):
                return
            self._claims.append(claim)
            if Holder.read(self.path) != other:
                return
            storage.remove(self.path)
        else:
            moved = f"{self.path}.stale-{self.holder.token}"
            try:
                os.rename(self.path, moved)
            except FileNotFoundError:
                return
            if Holder.read(moved) != other:  # another run took it over first: that lock is live, put it back
                os.rename(moved, self.path)
                return
            os.unlink(moved)
        if why != "it was released":
            self.took_over = (
                f"took over the workdir lock of a run that ended without releasing it ({other.describe()}; {why})"
            )

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                holder = Holder.read(self.path)
                if holder == self.holder:
                    with contextlib.suppress(FileNotFoundError):
                        storage.touch(self.path)
                    continue
            except WorkdirError:  # an object store that did not answer: the next round renews, if it answers by then
                continue
            self._lost = holder.describe() if holder else "its lock file was removed"
            return

    def check(self) -> None:
        """Stop the run if another run took this lock (after this run stopped renewing it for STALE_S)."""
        if self._lost is not None:
            raise RunFailure(
                f"this run lost the lock of {self.directory} ({self._lost}); it stops without writing more: "
                "run one training per workdir"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        # A lock the store does not let this run remove goes stale and is taken over; the run's own outcome (a save
        # that failed on the same store, say) is what it reports.
        with contextlib.suppress(OSError, WorkdirError):
            if Holder.read(self.path) == self.holder:
                storage.remove(self.path)
            for claim in self._claims:  # no run can claim a lock with that token again: it ended
                storage.remove(claim)


@contextlib.contextmanager
def held(workdir: str) -> Iterator[WorkdirLock | None]:
    """The workdir's lock for a run's processes: process 0 takes it (None elsewhere) and tells the others whether it
    did, so every process of a refused run stops before it writes."""
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
    refused = None
    if lock is not None:
        try:
            lock.acquire()
        except WorkdirError as e:
            refused = e
    if jax.process_count() > 1 and not multihost_utils.broadcast_one_to_all(np.array(refused is None)):
        refused = refused or WorkdirError(f"process 0 could not take the lock of {workdir}; its output says why")
    if refused is not None:
        raise refused
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
