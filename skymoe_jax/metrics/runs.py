"""Runs read back from WORKDIR/metrics.jsonl, for `skymoe report`, the notebook and experiment
scripts: metric series as arrays, and a one-row summary per run."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from skymoe_jax.errors import UserError


class ReportError(UserError):
    """A workdir that holds no readable metrics."""


@dataclasses.dataclass
class Run:
    name: str
    workdir: str
    records: list[dict[str, Any]]  # one per logged step, ascending, one per step

    def has(self, key: str) -> bool:
        """Whether any record holds a finite value for key (Max2/Max3 with two experts never does)."""
        return any(np.isfinite(np.asarray(r.get(key), dtype=np.float64)).any() for r in self.records)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps [N], values [N, ...]) of the records that hold key; JSON null (non-finite) becomes NaN."""
        rows = [r for r in self.records if r.get(key) is not None]
        return (np.array([r["step"] for r in rows], dtype=np.int64), np.array([r[key] for r in rows], dtype=np.float64))

    @property
    def last_step(self) -> int:
        return self.records[-1]["step"]


def load_run(workdir: str, name: str | None = None) -> Run:
    """The records of WORKDIR/metrics.jsonl. A step logged twice (a run resumed from an earlier
    checkpoint repeats the steps after it) keeps its latest record."""
    if not os.path.isdir(workdir):
        raise ReportError(f"{workdir}: no such directory; give the --workdir of a `skymoe train` run")
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ReportError(f"{path} not found: {workdir} is not a run's workdir, or its run has not logged yet")
    by_step: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ReportError(
                    f"{path} line {number} is not JSON ({e.msg}); the file is damaged (or not written by skymoe train)"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ReportError(f"{path} line {number} has no integer 'step'; not written by skymoe train")
            by_step[record["step"]] = record
    if not by_step:
        raise ReportError(f"{path} is empty: the run has not logged a step yet (train.log_every)")
    return Run(name or os.path.basename(os.path.abspath(workdir)), workdir, [by_step[s] for s in sorted(by_step)])


def load_runs(workdirs: Sequence[str]) -> list[Run]:
    """Runs named by their directory, or by the path as given where two directories share a name."""
    names = [os.path.basename(os.path.abspath(w)) for w in workdirs]
    return [load_run(w, name if names.count(name) == 1 else os.path.normpath(w)) for w, name in zip(workdirs, names)]


# Summary columns: (heading, key, how); routing statistics average the last TAIL of the steps,
# since they move from step to step, and the layers.
TAIL = 0.2
COLUMNS = (
    ("train CE", "ce_loss", "tail"),
    ("eval loss", "eval_loss", "last"),
    ("drop rate %", "drop_rate", "tail"),
    ("Max1/Max2", "max1_max2", "tail"),
    ("Max2/Max3", "max2_max3", "tail"),
    ("busiest expert / uniform", "expert_load", "busiest"),
    ("MaxVio", "max_vio", "tail"),
    ("MaxVio of the mean load", "expert_load", "mean load"),
    ("seq MaxVio", "seq_max_vio", "tail"),
    ("seq MaxVio shuffled", "seq_max_vio_shuffled", "tail"),
    ("alpha", "alpha", "last"),
    ("expert bias spread", "expert_bias", "spread"),
    ("expert similarity", "expert_similarity", "last"),
    ("tokens/s", "tokens_per_sec", "tail"),
    ("MFU %", "mfu", "tail"),
)


def summarize(run: Run) -> dict[str, float]:
    """Final values: 'last' = the last record holding the key ('spread': of max - min over the experts);
    'tail' = mean over the records of the last 20% of steps ('busiest': of the busiest expert's share over the
    uniform share; 'mean load': MaxVio of each layer's load averaged over those records, the imbalance that
    persists from batch to batch); per-layer values are averaged over layers. Percent columns are scaled."""
    out = {}
    for heading, key, how in COLUMNS:
        if not run.has(key):
            continue
        steps, values = run.series(key)
        tail = steps > (1 - TAIL) * run.last_step
        if how == "busiest":  # [steps, layers, experts] shares -> the busiest expert over the uniform share
            values = values.max(-1) * values.shape[-1]
        if how == "spread":  # [steps, layers, experts] -> max - min over the experts
            values = values.max(-1) - values.min(-1)
        chosen = values[-1:] if how in ("last", "spread") or not tail.any() else values[tail]
        if how == "mean load":  # [steps, layers, experts] -> MaxVio of the load averaged over the chosen steps
            mean = chosen.mean(axis=0)
            chosen = mean.shape[-1] * mean.max(axis=-1) - 1
        out[heading] = float(np.nanmean(chosen)) * (100 if heading.endswith("%") else 1)
    return out


def summary_table(runs: Sequence[Run]) -> str:
    """A markdown table: one row per run, the columns any run has."""
    summaries = [summarize(r) for r in runs]
    headings = [h for h, _, _ in COLUMNS if any(h in s for s in summaries)]
    lines = ["| run | steps | " + " | ".join(headings) + " |", "| --- " * (len(headings) + 2) + "|"]
    for run, s in zip(runs, summaries):
        cells = [_format(s[h]) if h in s else "-" for h in headings]
        lines.append(f"| {run.name} | {run.last_step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4f}" if abs(value) < 0.1 else f"{value:.3f}"
