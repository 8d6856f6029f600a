"""What the experiment-tracker writers (wandb_writer.py, mlflow_writer.py) share: the tracker run a workdir logs
to, kept in WORKDIR/trackers.json so that a resumed run goes on with the same one."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from skymoe_jax.errors import CheckpointError, first_line

RUNS_FILE = "trackers.json"


def stored_run(workdir: str, tracker: str, destination: dict[str, str]) -> str | None:
    """The id of the run this workdir logged to on `tracker`, if it went to the same destination (the settings
    that name where runs go: a changed W&B project or MLflow experiment starts a new run there)."""
    path = os.path.join(workdir, RUNS_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            entry = json.load(f).get(tracker)
        return entry["id"] if entry and entry["destination"] == destination else None
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{path} cannot be read ({first_line(e, limit=200)}); remove it, and the run logs to new tracker runs"
        ) from None


def store_run(workdir: str, tracker: str, destination: dict[str, str], run_id: str) -> None:
    path = os.path.join(workdir, RUNS_FILE)
    runs: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            runs = json.load(f)
    runs[tracker] = {"id": run_id, "destination": destination}
    # Written whole and renamed: a run killed mid-write leaves the previous file, never half of one.
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(runs, f, indent=2)
    os.replace(path + ".tmp", path)


def warn(line: str) -> None:
    """A tracker that could not mark its run finished: the records are logged already, so the run goes on."""
    print(f"skymoe: {line}", file=sys.stderr, flush=True)
