"""Weights & Biases (metrics.wandb): the metrics records, as `writers.scalars` at their step, and the flattened
config, from process 0, into one W&B run per workdir. Its id is kept in WORKDIR/trackers.json, so a resumed run
goes on with the same W&B run; W&B's local files are under WORKDIR/wandb (WANDB_MODE=offline: one folder per start,
which `wandb sync WORKDIR/wandb/offline-run-*` uploads in order into the one run)."""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import wandb

from skymoe_jax.config import flatten, wandb_tags
from skymoe_jax.errors import TrackerError, first_line
from skymoe_jax.metrics import trackers
from skymoe_jax.metrics.writers import scalars


class WandbWriter:
    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        settings = config.metrics.wandb
        self.path = f"the W&B project {settings.project}"
        self._run = None
        if jax.process_index() != 0:
            return
        destination = {"project": settings.project}
        try:
            self._run = wandb.init(
                project=settings.project,
                name=settings.name or os.path.basename(os.path.abspath(workdir)),
                tags=wandb_tags(settings.tags),
                id=trackers.stored_run(workdir, "wandb", destination),
                resume="allow",
                dir=workdir,
                config=dict(flatten(config)),
                allow_val_change=True,  # a resumed run may change fields (train.steps, the schedule)
                reinit="create_new",  # a run of its own, whatever W&B run the process has open (a notebook's)
            )
        except wandb.errors.Error as e:
            raise TrackerError(first_line(e, limit=300)) from e
        trackers.store_run(workdir, "wandb", destination, self._run.id)
        self.path = f"the W&B run {self._run.id} of project {settings.project}"

    def write(self, record: dict[str, Any]) -> None:
        if self._run is not None:
            try:
                self._run.log(dict(scalars(record)), step=record["step"])
            except wandb.errors.Error as e:
                raise TrackerError(first_line(e, limit=300)) from e

    def close(self, failed: bool = False) -> None:
        """Finish the run, marked failed when the training ended by an exception."""
        if self._run is not None:
            run, self._run = self._run, None
            try:
                run.finish(exit_code=1 if failed else 0)
            except wandb.errors.Error as e:
                trackers.warn(f"could not finish {self.path} ({first_line(e, limit=300)}); its records are logged")
