"""TensorBoard event files from the records that also go to metrics.jsonl. Only process 0 writes.

Tags: a scalar keeps its metrics.jsonl key (`loss`, `mfu`); a per-MoE-layer list becomes
`KEY/layer_I` (I: the I-th MoE layer, as in the JSONL lists) plus `KEY/mean` over layers;
`expert_load` becomes `expert_load/layer_I/expert_J`. Non-finite values (JSON null) are skipped.

The file is written here, not with tensorboardX: that imports PyTorch whenever it is installed, which
added 217 MiB to the default training run's resident memory for a writer of scalars. An event file is a TFRecord
file (each record framed by its length and masked CRC-32C checksums) of `Event` protocol buffers; a
record here is one metrics record, its scalars as the `simple_value`s of one `Summary`.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np


def scalars(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """(tag, value) for every finite number in a metrics record, except the step."""
    for key, value in record.items():
        if key == "step":
            continue
        array = np.asarray(value, dtype=np.float64)
        if array.ndim == 0:
            yield key, float(array)
        elif array.ndim == 1:
            yield from ((f"{key}/layer_{i}", float(v)) for i, v in enumerate(array))
            if np.isfinite(array).any():
                yield f"{key}/mean", float(np.nanmean(array))
        else:
            for index in np.ndindex(array.shape):
                yield key + "".join(f"/{axis}_{i}" for axis, i in zip(("layer", "expert"), index)), float(array[index])


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # the Castagnoli polynomial, reflected
        table.append(crc)
    return tuple(table)


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, the length's masked CRC, the data, the data's masked CRC."""
    length = struct.pack("<Q", len(data))
    return length + _masked_crc(length) + data + _masked_crc(data)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _message(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _varint(len(payload)) + payload


def event(step: int, wall_time: float, values: Iterable[tuple[str, float]] = (), file_version: str = "") -> bytes:
    """An encoded `Event` (wall_time = 1, step = 2, file_version = 3, summary = 5) whose `Summary` holds one
    `Value` (tag = 1, simple_value = 2, a float32) per (tag, value)."""
    out = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(step)
    if file_version:
        out += _message(3, file_version.encode())
    summary = b"".join(_message(1, _message(1, tag.encode()) + _key(2, 5) + struct.pack("<f", v)) for tag, v in values)
    return out + _message(5, summary) if summary else out


class TensorBoardWriter:
    def __init__(self, logdir: str):
        self.path = logdir
        self._file = None
        if jax.process_index() == 0:
            os.makedirs(logdir, exist_ok=True)
            # A resumed run adds a file beside the earlier ones; TensorBoard reads them all.
            name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
            self._file = open(os.path.join(logdir, name), "ab")
            self._file.write(tfrecord(event(0, time.time(), file_version="brain.Event:2")))

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        values = [(tag, value) for tag, value in scalars(record) if math.isfinite(value)]
        self._file.write(tfrecord(event(record["step"], time.time(), values)))
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
