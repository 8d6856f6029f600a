"""Where a run writes the workdir's files that grow (metrics.jsonl, TensorBoard's event files, the libraries' logs,
the trackers' run ids).

A local workdir holds them itself. Object storage has no append, so for an `s3://` or `gs://` workdir they are
written in a local directory (under TMPDIR, named like the workdir, so trackers name their runs the same) and each
changed file is uploaded whole at every checkpoint and when the run ends: a PUT per metrics record would cost a
request per logged step, and rewriting the object at each record an upload quadratic in the run's length. What a
killed run logged after its last checkpoint is lost there, and its resumed run logs those steps again (a local
workdir has them twice: readers keep a step's last record). A resumed run first downloads metrics.jsonl and the
trackers' ids, which it appends to or reads; TensorBoard starts a new event file per run anyway.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from skymoe_jax.checkpoint import storage

_CARRIED = ("metrics.jsonl", "trackers.json")  # read back or appended to by a resumed run


class Staging:
    """`path(name)`: where to write the workdir's file `name`; `push()` uploads what changed (nothing to do for a
    local workdir). As a context manager it removes the local copy at the end, unless the run failed: its error may
    name the log there."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.remote = storage.is_url(workdir)
        self._pushed: dict[str, tuple[int, int]] = {}  # local file -> (size, mtime) when last uploaded or downloaded
        if not self.remote:
            self.directory = workdir
            return
        self.directory = os.path.join(tempfile.mkdtemp(prefix="skymoe-"), storage.split(workdir)[1])
        os.makedirs(self.directory)
        for name in _CARRIED:
            if storage.exists(storage.join(workdir, name)):
                local = self.path(name)
                with open(local, "wb") as f:
                    f.write(storage.read_bytes(storage.join(workdir, name)))
                self._pushed[local] = _stamp(local)

    def path(self, *names: str) -> str:
        return os.path.join(self.directory, *names)

    def push(self) -> None:
        """Upload each file written or grown since the last push."""
        if not self.remote:
            return
        for root, _, files in os.walk(self.directory):
            for name in sorted(files):
                local = os.path.join(root, name)
                if self._pushed.get(local) != (stamp := _stamp(local)):
                    relative = os.path.relpath(local, self.directory).split(os.sep)
                    storage.upload(local, storage.join(self.workdir, *relative))
                    self._pushed[local] = stamp

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self.remote and kind is None:
            shutil.rmtree(os.path.dirname(self.directory), ignore_errors=True)


def _stamp(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns
