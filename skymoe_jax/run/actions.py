"""A run's periodic work as small actions the loop calls after every step (clu's periodic actions and t5x's
actions are the models).

Each step the loop asks the Schedule what is due (a Due), then calls every action with it, in list order:
the finite guard reads back the step's finite flags before anything reports or keeps the step; the
recorder writes a metrics record, with evaluation and expert similarity at their steps; the saver writes
a checkpoint. Stopping on a signal stays in the loop, since it ends it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from skymoe_jax.checkpoint.manager import Checkpointer
from skymoe_jax.errors import TrackerError, TrainingError, write_failed
from skymoe_jax.metrics.flops import mfu
from skymoe_jax.training.preemption import StopSignals


class Due(NamedTuple):
    step: int
    log: bool
    eval: bool
    similarity: bool
    save: bool
    stop: bool  # a stop signal: save, then leave the loop
    last: bool

    @property
    def reported(self) -> bool:
        """A record is written at this step."""
        return self.log or self.eval or self.similarity or self.last

    @property
    def kept(self) -> bool:
        """The step is reported or saved: its (and earlier steps') finite flags must be known first."""
        return self.log or self.eval or self.save or self.stop or self.last


class Schedule:
    def __init__(self, t: ml_collections.ConfigDict, ckpt: Checkpointer, signals: StopSignals, similarity_every: int):
        self.t, self.ckpt, self.signals, self.similarity_every = t, ckpt, signals, similarity_every

    def at(self, step: int) -> Due:
        t, last = self.t, step == self.t.steps
        return Due(
            step=step,
            log=step % t.log_every == 0,
            eval=bool(t.eval_every) and (step % t.eval_every == 0 or last),
            similarity=bool(self.similarity_every) and (step % self.similarity_every == 0 or last),
            save=self.ckpt.due(step) or last,
            stop=self.signals.requested(step),  # with several processes a collective: asked every step
            last=last,
        )


class FiniteGuard:
    """Counts the steps whose update was dropped for a non-finite loss or gradient, or stops the run
    (train.nonfinite=stop). The flags stay on the device until a step is kept, so the host runs ahead."""

    def __init__(self, policy: str, ckpt: Checkpointer):
        self.policy, self.ckpt = policy, ckpt
        self.skipped = 0
        self._pending: list[tuple[int, jax.Array]] = []

    def __call__(self, due: Due, state, metrics: dict[str, Any]) -> None:
        self._pending.append((due.step, metrics["finite"]))
        if due.kept:
            self.skipped += self._read_back()

    def _read_back(self) -> int:
        bad = [step for step, finite in self._pending if not bool(finite)]
        self._pending = []
        if bad and self.policy == "stop":
            kept = self.ckpt.latest_step()
            where = (
                f"the last checkpoint, step {kept} in {self.ckpt.directory}, is untouched"
                if kept
                else "no checkpoint was written"
            )
            raise TrainingError(
                f"non-finite loss or gradients at step {bad[0]} (its update was not applied); "
                f"stopped: {where}. Set --config.train.nonfinite=skip to skip such steps instead"
            )
        return len(bad)


class Recorder:
    """The metrics record of a reported step: the step's metrics, tokens/s and MFU since the last record,
    skipped steps, and at their steps expert similarity and evaluation; written to every writer and shown
    on the console. Evaluation and similarity time is not counted as training throughput."""

    def __init__(
        self,
        *,
        writers: list,
        ckpt: Checkpointer,
        console,
        guard: FiniteGuard,
        tokens_per_step: int,
        devices: int,
        flops_per_token: float,
        peak: float,
        evaluate: Callable[[Any], dict[str, Any]],  # the train state -> eval metrics
        similarity: Callable | None,
        live: Callable[[dict[str, Any]], str],
        start: int,
    ):
        self.writers, self.ckpt, self.console, self.guard = writers, ckpt, console, guard
        self.tokens_per_step, self.devices, self.flops_per_token, self.peak = (
            tokens_per_step,
            devices,
            flops_per_token,
            peak,
        )
        self.evaluate, self.similarity, self.live = evaluate, similarity, live
        self.last_time, self.last_step = time.perf_counter(), start
        self.record: dict[str, Any] | None = None
        self.evals: dict[str, Any] = {}

    def __call__(self, due: Due, state, metrics: dict[str, Any]) -> None:
        if not due.reported:
            return
        record = {"step": due.step, **jax.device_get(metrics)}
        del record["finite"]
        now = time.perf_counter()
        record["tokens_per_sec"] = (due.step - self.last_step) * self.tokens_per_step / (now - self.last_time)
        if self.peak:
            record["mfu"] = mfu(record["tokens_per_sec"] / self.devices, self.flops_per_token, self.peak)
        record["skipped_steps"] = self.guard.skipped
        self.last_time, self.last_step = now, due.step
        if due.similarity:
            record["expert_similarity"] = jax.device_get(self.similarity(state.params))
        if due.eval:
            self.evals = self.evaluate(state)
            record.update(self.evals)
            self.console.print(f"step {due.step}: {self.live(record)}  eval loss {self.evals['eval_loss']:.3f}")
        if due.eval or due.similarity:
            self.last_time = time.perf_counter()
        for writer in self.writers:
            try:
                writer.write(record)
            except (OSError, TrackerError) as e:
                raise write_failed(
                    f"writing the metrics of step {due.step} to {writer.path}", e, self.ckpt.kept()
                ) from None
        self.console.update(due.step, self.live(record))
        self.record = record

    def summary(self) -> dict[str, Any]:
        """The last record's loss, throughput, evaluation, MFU, drop rates and alphas ({} before any)."""
        r = self.record
        if r is None:
            return {}
        out = dict(loss=float(r["loss"]), tokens_per_sec=float(r["tokens_per_sec"]), **self.evals)
        if "mfu" in r:
            out["mfu"] = float(r["mfu"])
        if "drop_rate" in r:
            out.update(drop_rate=np.asarray(r["drop_rate"]).tolist(), alpha=np.asarray(r["alpha"]).tolist())
        return out


class Saver:
    """A checkpoint at train.checkpoint_every steps, the last step, and a stop."""

    def __init__(self, ckpt: Checkpointer, config: ml_collections.ConfigDict, data_iter):
        self.ckpt, self.config, self.data_iter = ckpt, config, data_iter

    def __call__(self, due: Due, state, metrics: dict[str, Any]) -> None:
        if due.save or due.stop:
            self.ckpt.save(due.step, state, self.config, self.data_iter)
