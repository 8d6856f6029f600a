"""MLflow (metrics.mlflow): the metrics records, as `writers.scalars` at their step, and the flattened config as
the run's params, from process 0, into one MLflow run per workdir. Its id is kept in WORKDIR/trackers.json, so a
resumed run goes on with the same MLflow run.

MLflow keeps a param's first value, so a resumed run's params are the config it started with, plus any field the
run did not have; the config each start used is in its checkpoints (and W&B takes the latest)."""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

from skymoe_jax.config import flatten
from skymoe_jax.errors import TrackerError, first_line
from skymoe_jax.metrics import trackers
from skymoe_jax.metrics.writers import scalars


class MlflowWriter:
    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        settings = config.metrics.mlflow
        self.path = f"the MLflow experiment {settings.experiment}"
        self._client: MlflowClient | None = None
        if jax.process_index() != 0:
            return
        try:
            client = MlflowClient(settings.tracking_uri or None)  # None: MLFLOW_TRACKING_URI, else MLflow's default
            destination = {"tracking_uri": client.tracking_uri, "experiment": settings.experiment}
            run_id = trackers.stored_run(workdir, "mlflow", destination)
            if run_id is None:
                experiment = client.get_experiment_by_name(settings.experiment)
                experiment_id = (
                    experiment.experiment_id if experiment else client.create_experiment(settings.experiment)
                )
                run_id = client.create_run(
                    experiment_id, run_name=os.path.basename(os.path.abspath(workdir))
                ).info.run_id
                trackers.store_run(workdir, "mlflow", destination, run_id)
                logged = {}
            else:
                client.update_run(run_id, status="RUNNING")
                logged = client.get_run(run_id).data.params
            params = [Param(key, str(value)) for key, value in flatten(config) if key not in logged]
            for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(run_id, params=params[i : i + MAX_PARAMS_TAGS_PER_BATCH])
        except MlflowException as e:
            raise TrackerError(first_line(e, limit=300)) from e
        self._client, self._run_id = client, run_id
        self.path = f"the MLflow run {run_id} at {client.tracking_uri}"

    def write(self, record: dict[str, Any]) -> None:
        if self._client is None:
            return
        now_ms = int(time.time() * 1000)
        metrics = [Metric(name, value, now_ms, record["step"]) for name, value in scalars(record)]
        try:
            # A record of a large model (expert_load: layers x experts) can pass MLflow's metrics per request.
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                self._client.log_batch(self._run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH])
        except MlflowException as e:
            raise TrackerError(first_line(e, limit=300)) from e

    def close(self, failed: bool = False) -> None:
        """Mark the run finished, or failed when the training ended by an exception."""
        if self._client is not None:
            client, self._client = self._client, None
            try:
                client.set_terminated(self._run_id, "FAILED" if failed else "FINISHED")
            except MlflowException as e:
                trackers.warn(
                    f"could not mark {self.path} finished ({first_line(e, limit=300)}); its records are logged"
                )
