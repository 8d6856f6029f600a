"""Metric writers: metrics.jsonl (one JSON object per logged step) and the console
progress bar (TensorBoard: tensorboard.py; W&B and MLflow: wandb_writer.py, mlflow_writer.py). Only process 0
writes.

The writers other than metrics.jsonl take a record as named scalars (`scalars`): a scalar keeps its
metrics.jsonl key (`loss`, `mfu`); a per-MoE-layer list becomes `KEY/layer_I` (I: the I-th MoE layer, as in the
JSONL lists) plus `KEY/mean` over layers; `expert_load` becomes `expert_load/layer_I/expert_J` (and `expert_bias`
alike). Non-finite values
(null in metrics.jsonl) are left out.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np


def to_json_value(value: Any) -> Any:
    """numpy / jax values -> JSON; non-finite floats become null (JSON has no NaN)."""
    value = np.asarray(value)
    if value.ndim:
        return [to_json_value(v) for v in value]
    item = value.item()
    if isinstance(item, float) and not math.isfinite(item):
        return None
    return item


def scalars(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """(name, value) for every finite number in a metrics record, except the step."""
    for key, value in record.items():
        if key == "step":
            continue
        array = np.asarray(value, dtype=np.float64)
        if array.ndim == 0:
            named = [(key, float(array))]
        elif array.ndim == 1:
            named = [(f"{key}/layer_{i}", float(v)) for i, v in enumerate(array)]
            if np.isfinite(array).any():
                named.append((f"{key}/mean", float(np.nanmean(array))))
        else:
            named = [
                (key + "".join(f"/{axis}_{i}" for axis, i in zip(("layer", "expert"), index)), float(array[index]))
                for index in np.ndindex(array.shape)
            ]
        yield from ((name, v) for name, v in named if math.isfinite(v))


class JsonlWriter:
    """Appends one line per record, each with one write call, so a reader polling the file (a test, a dashboard)
    never takes half a record for a whole one; a line cut short by a killed run is removed before appending."""

    def __init__(self, path: str):
        self.path = path
        self._fd = None
        if jax.process_index() == 0:
            _drop_partial_line(path)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        if self._fd is not None:
            data = (json.dumps({k: to_json_value(v) for k, v in record.items()}) + "\n").encode()
            while data:
                data = data[os.write(self._fd, data) :]

    def close(self, failed: bool = False) -> None:
        """Close the file. `failed` (the training ended by an exception) is for the trackers, which mark their run."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _drop_partial_line(path: str) -> None:
    """Truncate after the last newline: a run killed mid-write left a record without its end."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The complete records: a last line without its newline is one still being written (or cut by a kill)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]


class Console:
    """Lines on stdout from process 0, with a rich progress bar (ETA, live loss / drop rate / alpha)
    when stdout is a terminal or a Jupyter notebook and the bar is wanted."""

    def __init__(self, total_steps: int, start_step: int, progress_bar: bool = True):
        self.enabled = jax.process_index() == 0
        self._progress = None
        if self.enabled and progress_bar and (sys.stdout.isatty() or _in_jupyter()):
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[live]}"),
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, live="compiling")
            self._progress.start()

    def update(self, step: int, live: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, live=live)

    def print(self, line: str) -> None:
        if self._progress is not None:
            self._progress.console.print(line, highlight=False)
        elif self.enabled:
            print(line, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def _in_jupyter() -> bool:
    """A Jupyter kernel, where rich draws the bar as a widget although stdout is not a terminal."""
    from rich.console import Console as RichConsole

    return RichConsole().is_jupyter
