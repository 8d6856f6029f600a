"""The workdir lock on its own: a live holder refuses, a dead or silent one is taken over, a lost lock stops the
run, and releasing leaves another run's lock alone. (test_faults.py runs it through `skymoe train`.)"""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from skymoe_jax.errors import RunFailure, WorkdirError
from skymoe_jax.run.workdir_lock import LOCK_NAME, Holder, WorkdirLock


def _foreign_lock(workdir, host="node-7", pid=4242, token="feedc0de"):
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_NAME)
    with open(path, "w") as f:
        json.dump({"host": host, "pid": pid, "started": "2026-12-01T00:00:00+00:00", "token": token}, f)
    return path


def test_a_live_holder_on_this_host_is_named_and_kept(tmp_path):
    with WorkdirLock(tmp_path) as first:
        with pytest.raises(WorkdirError) as e:
            WorkdirLock(tmp_path).acquire()
        held = first.holder
        assert f"host {held.host}, pid {os.getpid()}, started {held.started}" in str(e.value)
        assert Holder.read(first.path) == held
    assert not os.path.exists(first.path)


def test_the_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _foreign_lock(tmp_path, host=socket.gethostname(), pid=dead.pid)
    with WorkdirLock(tmp_path) as lock:
        assert f"pid {dead.pid}" in lock.took_over and "its process is gone" in lock.took_over
        assert Holder.read(lock.path) == lock.holder


def test_another_hosts_lock_not_renewed_for_stale_s_is_taken_over(tmp_path):
    path = _foreign_lock(tmp_path)
    old = time.time() - 600
    os.utime(path, (old, old))
    with WorkdirLock(tmp_path) as lock:
        assert "host node-7, pid 4242" in lock.took_over
        # The age is the file server's: 600 s give or take the second this test takes.
        assert "not renewed for 60" in lock.took_over
        assert Holder.read(lock.path) == lock.holder


def test_another_hosts_lock_that_is_renewed_is_refused_within_a_renewal(tmp_path):
    path = _foreign_lock(tmp_path)
    stop = threading.Event()

    def renew():  # the other host's run, alive
        while not stop.wait(0.05):
            os.utime(path)

    thread = threading.Thread(target=renew)
    thread.start()
    try:
        start = time.monotonic()
        with pytest.raises(WorkdirError, match="in use by another run .host node-7, pid 4242"):
            WorkdirLock(tmp_path, renew_s=0.2, stale_s=5.0).acquire()
        assert time.monotonic() - start < 2.0
    finally:
        stop.set()
        thread.join()


def test_a_silent_other_host_is_waited_for_until_stale(tmp_path, capsys):
    _foreign_lock(tmp_path)
    start = time.monotonic()
    with WorkdirLock(tmp_path, renew_s=0.2, stale_s=1.0) as lock:
        assert 0.8 < time.monotonic() - start < 5.0
        assert "not renewed for 1 s" in lock.took_over
    assert "waiting up to 1 s for the workdir lock of host node-7" in capsys.readouterr().out


def test_a_holder_that_lost_its_lock_stops_and_leaves_the_new_holders_file(tmp_path):
    lock = WorkdirLock(tmp_path, renew_s=0.05)
    lock.acquire()
    lock.check()
    _foreign_lock(tmp_path, token="another")
    deadline = time.monotonic() + 5
    while lock._lost is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(RunFailure, match="lost the lock .*host node-7, pid 4242"):
        lock.check()
    lock.release()
    assert Holder.read(lock.path).token == "another"


def test_an_unreadable_lock_file_is_not_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text("not json")
    with pytest.raises(WorkdirError, match="not a lock a run holds now.*remove the file"):
        WorkdirLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).read_text() == "not json"
