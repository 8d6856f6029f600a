"""TensorBoard event files (tensorboardX: protobuf only, no TensorFlow) from the records
that also go to metrics.jsonl. Only process 0 writes.

Tags: a scalar keeps its metrics.jsonl key (`loss`, `mfu`); a per-MoE-layer list becomes
`KEY/layer_I` (I: the I-th MoE layer, as in the JSONL lists) plus `KEY/mean` over layers;
`expert_load` becomes `expert_load/layer_I/expert_J`. Non-finite values (JSON null) are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
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


class TensorBoardWriter:
    def __init__(self, logdir: str):
        self._writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir, flush_secs=30)

    def write(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            return
        for tag, value in scalars(record):
            if math.isfinite(value):
                self._writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
