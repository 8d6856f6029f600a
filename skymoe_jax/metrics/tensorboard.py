"""TensorBoard event files from the records that also go to metrics.jsonl, one scalar per `writers.scalars`
name. Only process 0 writes.

The `tensorboard` package encodes the events (its `Event` protos) and frames them (its TFRecord `RecordWriter`,
with the CRC-32C checksums). Not its `EventFileWriter`: that one loads `tensorboard.compat.tf`, which imports
TensorFlow wherever it is installed, and writes from a thread, so a failed write would surface records later.
RecordWriter and the protos import neither TensorFlow nor PyTorch and add about 10 MiB to a training process
(measured in docs/trackers.md); tensorboardX, the other maintained writer, imports PyTorch wherever it is
installed (217 MiB).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import jax
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter

from skymoe_jax.metrics.writers import scalars


class TensorBoardWriter:
    def __init__(self, logdir: str):
        self.path = logdir
        self._records = None
        if jax.process_index() == 0:
            os.makedirs(logdir, exist_ok=True)
            # A resumed run adds a file beside the earlier ones; TensorBoard reads them all.
            name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
            self._records = RecordWriter(open(os.path.join(logdir, name), "ab"))
            self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def write(self, record: dict[str, Any]) -> None:
        if self._records is not None:
            values = [Summary.Value(tag=tag, simple_value=value) for tag, value in scalars(record)]
            self._write(Event(step=record["step"], wall_time=time.time(), summary=Summary(value=values)))

    def _write(self, event: Event) -> None:
        self._records.write(event.SerializeToString())
        self._records.flush()

    def close(self, failed: bool = False) -> None:
        if self._records is not None:
            self._records.close()
            self._records = None
