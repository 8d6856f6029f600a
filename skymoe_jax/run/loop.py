"""train(): the whole run, top to bottom (its periodic work is in actions.py). Also evaluate() for
`skymoe eval`."""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from skymoe_jax.checkpoint import storage
from skymoe_jax.checkpoint.initial import initial_state
from skymoe_jax.checkpoint.manager import Checkpointer
from skymoe_jax.config import require_extras
from skymoe_jax.data.inputs import make_datasets
from skymoe_jax.errors import TrackerError, write_failed
from skymoe_jax.metrics.flops import flops_per_token, peak_flops, pipeline_utilization, stage_flops_per_token
from skymoe_jax.metrics.similarity import similarity_fn
from skymoe_jax.metrics.tensorboard import TensorBoardWriter
from skymoe_jax.metrics.writers import Console, JsonlWriter
from skymoe_jax.model.mesh_layout import pipeline_stage_layers
from skymoe_jax.model.pipeline import bubble_fraction
from skymoe_jax.model.spec import ModelSpec
from skymoe_jax.run import compile_cache, library_logs, workdir_lock
from skymoe_jax.run.actions import FiniteGuard, Recorder, Saver, Schedule
from skymoe_jax.run.host_memory import release_free_heap
from skymoe_jax.run.staging import Staging
from skymoe_jax.training import runtime as runtime_lib
from skymoe_jax.training.preemption import StopSignals


def _datasets(config: ml_collections.ConfigDict):
    return make_datasets(config, process_index=jax.process_index(), process_count=jax.process_count())


def _evaluate(eval_step, state, batches) -> dict[str, Any]:
    """Token-weighted CE over the cached validation batches, and mean eval drop rate per layer."""
    results = [eval_step(state.params, b, state.bias) for b in batches]
    ce = sum(float(r["ce_sum"]) for r in results) / max(sum(float(r["tokens"]) for r in results), 1.0)
    out = {"eval_loss": ce}
    if "drop_rate" in results[0]:
        out["eval_drop_rate"] = np.mean([np.asarray(r["drop_rate"]) for r in results], axis=0)
    return out


def _live(record: dict[str, Any]) -> str:
    parts = [f"loss {record['loss']:.3f}"]
    if "drop_rate" in record:
        parts.append(f"drop {100 * float(np.mean(record['drop_rate'])):.2f}%")
        parts.append(f"alpha {float(np.mean(record['alpha'])):.4f}")
    parts.append(f"{record['tokens_per_sec']:,.0f} tok/s")
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    return "  ".join(parts)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train (or resume) in workdir; returns the final summary. Writes WORKDIR/metrics.jsonl."""
    t = config.train
    require_extras(config)  # a tracker whose package is missing stops here, before anything starts
    compile_cache.enable(t.compilation_cache_dir)
    runtime = runtime_lib.build(config)  # a mesh that does not fit stops here
    train_ds, val_ds = _datasets(config)  # and bad data here, before anything is written
    storage.check(workdir)  # and an object store that cannot be used here
    # A second run on a live workdir stops here, having written nothing.
    with workdir_lock.held(workdir) as lock, Staging(workdir) as files:
        with library_logs.logged_to(_library_log(files)):
            val_batches = list(itertools.islice(iter(val_ds), t.eval_batches))
            train_iter = iter(train_ds)
            with jax.set_mesh(runtime.mesh), compile_cache.kept_out(runtime.mesh):
                return _train(
                    config, workdir, runtime, train_iter, [runtime.batch(b) for b in val_batches], lock, files
                )


def _train(
    config, workdir, runtime, train_iter, val_batches, lock: workdir_lock.WorkdirLock | None, files: Staging
) -> dict[str, Any]:
    t = config.train
    ckpt = Checkpointer(
        workdir,
        t.checkpoint_every,
        t.keep_checkpoints,
        t.keep_every,
        create=True,
        asynchronous=t.async_checkpointing,
        failure_log=_library_log(files),
    )
    notes = [lock.took_over] if lock is not None and lock.took_over else []
    # Saves a killed or failed run left unfinished: with the lock held, no other run's save can be in progress.
    if lock is not None:
        notes += [f"removed {name}, a save an earlier run left unfinished" for name in ckpt.remove_partial()]
    latest = ckpt.latest_step()
    if latest is None:
        state, origin = initial_state(config, runtime)
    else:
        state, origin = ckpt.restore(latest, runtime.abstract_state(), train_iter), f"resuming at step {latest}"
    start = latest or 0
    spec = ModelSpec.from_config(config)
    writers = _writers(config, files.directory, ckpt)
    console = Console(t.steps, start, progress_bar=t.progress)
    flops_tok = flops_per_token(spec, config.data.seq_len)
    similarity = similarity_fn(spec, runtime.mesh) if spec.num_experts else None
    console.print(
        f"{config.name}: {spec.num_layers} layers, {spec.num_experts or 'no'} experts, "
        f"{flops_tok / 1e6:.1f} MFLOP/token; {origin}; workdir {workdir}"
    )
    console.print(whoami(runtime))
    for note in notes:
        console.print(note)
    if len(stages := pipeline_stage_layers(config)) > 1:
        console.print(pipeline_summary(spec, config, stages))

    compile_start = time.perf_counter()
    batch = runtime.batch(next(train_iter))
    train_step = runtime.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - compile_start
    release_free_heap()  # the compiler's freed memory, before the step's buffers come on top of it
    guard = FiniteGuard(t.nonfinite, ckpt)
    recorder = Recorder(
        writers=writers,
        ckpt=ckpt,
        console=console,
        guard=guard,
        tokens_per_step=config.data.batch_size * config.data.seq_len,
        devices=runtime.mesh.size,
        flops_per_token=flops_tok,
        peak=peak_flops(config.metrics.peak_flops_per_device),
        evaluate=lambda state: _evaluate(runtime.eval_step, state, val_batches),
        similarity=similarity,
        live=_live,
        start=start,
    )
    actions = [guard, recorder, Saver(ckpt, config, train_iter)]
    trim_due = False
    failed = False
    try:
        with StopSignals(t.stop_check_every, functools.partial(_give_up, ckpt, lock)) as signals:
            schedule = Schedule(t, ckpt, signals, config.metrics.similarity_every if similarity else 0)
            for step in range(start + 1, t.steps + 1):
                if lock is not None:
                    lock.check()
                if step > start + 1:
                    batch = runtime.batch(next(train_iter))
                state, metrics = train_step(state, batch)
                due = schedule.at(step)
                for action in actions:
                    action(due, state, metrics)
                if due.save or due.stop:
                    _push(files, ckpt)
                # What evaluations, similarity and saves allocated and freed (compiles, host copies) would stay
                # under every later step. An asynchronous save frees its host copy of the state when its
                # background write ends, so that is trimmed again then.
                if due.eval or due.similarity or due.save:
                    release_free_heap()
                    trim_due = ckpt.saving()
                elif trim_due and not ckpt.saving():
                    release_free_heap()
                    trim_due = False
                if due.stop:
                    ckpt.wait()
                    console.print(
                        f"stopped by {signals.signal_name or 'another process'} after step {step}; "
                        f"saved checkpoint {ckpt.path(step)}; run the same command to resume"
                    )
                    return {"steps": step, "stopped": True, "workdir": workdir}
    except BaseException:
        failed = True  # the trackers mark their run failed
        raise
    finally:
        ckpt.close()
        for writer in writers:
            writer.close(failed)
        console.close()
        if failed:  # the metrics and logs up to the failure, if the store takes them: the failure is what is said
            with contextlib.suppress(Exception):
                files.push()
    _push(files, ckpt)

    summary = {
        "steps": t.steps,
        "compile_s": compile_s,
        "workdir": workdir,
        "skipped_steps": guard.skipped,
        **recorder.summary(),
    }
    console.print(summary_line(summary))
    return summary


def _library_log(files: Staging) -> str:
    return files.path("logs", f"process_{jax.process_index()}.log")


def _push(files: Staging, ckpt: Checkpointer) -> None:
    """Upload the metrics and logs written since the last push, when the workdir is on object storage."""
    try:
        files.push()
    except Exception as e:  # s3fs and gcsfs raise their clients' types; a store gone mid-run is no user mistake
        raise write_failed(f"uploading the run's metrics and logs to {files.workdir}", e, ckpt.kept()) from None


def _give_up(ckpt: Checkpointer, lock: workdir_lock.WorkdirLock | None, signal_name: str, gone: list[int]) -> None:
    """A stop with peers gone: no save can be made with them, and the loop may be stuck in a collective with them,
    so this process says so and ends now (from the stop watcher's thread), leaving its last checkpoint."""
    if lock is not None:
        lock.release()
    processes = ", ".join(map(str, gone))
    try:
        print(
            f"skymoe train: failed: stopped by {signal_name}, but process {processes} of the run no longer answers, so "
            f"no checkpoint can be saved with it; {ckpt.kept()}; run the same command to resume",
            file=sys.stderr,
            flush=True,
        )
    finally:  # a launcher that stopped reading the output must not keep this process waiting on the dead peer
        os._exit(1)


def _writers(config: ml_collections.ConfigDict, workdir: str, ckpt: Checkpointer) -> list:
    m = config.metrics
    jsonl, tensorboard = os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "tensorboard")
    opening = [(jsonl, lambda: JsonlWriter(jsonl))]
    if m.tensorboard:
        opening.append((tensorboard, lambda: TensorBoardWriter(tensorboard)))
    # The trackers' modules import their optional packages, so they are imported only when asked for.
    if m.wandb.project:
        from skymoe_jax.metrics.wandb_writer import WandbWriter

        opening.append((f"the W&B run of project {m.wandb.project}", lambda: WandbWriter(config, workdir)))
    if m.mlflow.experiment:
        from skymoe_jax.metrics.mlflow_writer import MlflowWriter

        opening.append((f"the MLflow run of experiment {m.mlflow.experiment}", lambda: MlflowWriter(config, workdir)))
    writers = []
    for what, open_writer in opening:
        try:
            writers.append(open_writer())
        except (OSError, TrackerError) as e:
            for opened in writers:  # a tracker run opened before this one ends as failed
                opened.close(failed=True)
            raise write_failed(f"opening {what}", e, ckpt.kept()) from None
    return writers


def whoami(runtime: runtime_lib.Runtime) -> str:
    """Where this run is: one process per node that owns a single GPU of eight shows as 1 local device."""
    device = jax.devices()[0]
    mesh = "x".join(str(n) for n in runtime.mesh.shape.values())
    return (
        f"devices: {device.platform} ({device.device_kind}), process {jax.process_index()} of "
        f"{jax.process_count()}, {jax.local_device_count()} local / {jax.device_count()} global; mesh {mesh} "
        f"(pipeline x data x expert, layout {runtime.layout})"
    )


def pipeline_summary(spec: ModelSpec, config: ml_collections.ConfigDict, stages: tuple[int, ...]) -> str:
    per_stage = stage_flops_per_token(spec, config.data.seq_len, stages)
    m, r = config.parallel.num_microbatches, config.parallel.pipeline_repeats
    kind = f"virtual stages ({r} chunks per device, circular)" if r > 1 else "stages"
    return (
        f"pipeline: {kind} {stages}, {m} microbatches; training MFLOP/token by stage "
        f"[{', '.join(f'{f / 1e6:.2f}' for f in per_stage)}] (head on the last); bubble "
        f"{100 * bubble_fraction(len(per_stage) // r, m, r):.1f}% for equal stages, "
        f"{100 * (1 - pipeline_utilization(per_stage, m, r)):.1f}% with this split's imbalance"
    )


def summary_line(s: dict[str, Any]) -> str:
    parts = [f"done: {s['steps']} steps"]
    if "loss" in s:
        parts.append(f"train loss {s['loss']:.3f}")
    if "eval_loss" in s:
        parts.append(f"val loss {s['eval_loss']:.3f}")
    if "drop_rate" in s:
        parts.append(f"drop rate {100 * np.mean(s['drop_rate']):.2f}% (max {100 * np.max(s['drop_rate']):.2f}%)")
        parts.append(f"alpha {min(s['alpha']):.4f}-{max(s['alpha']):.4f}")
    if "tokens_per_sec" in s:
        parts.append(f"{s['tokens_per_sec']:,.0f} tokens/s")
    if "mfu" in s:
        parts.append(f"MFU {100 * s['mfu']:.1f}%")
    if s.get("skipped_steps"):
        parts.append(f"{s['skipped_steps']} non-finite steps skipped")
    parts.append(f"compile {s['compile_s']:.0f}s")
    return ", ".join(parts) + f"; metrics in {os.path.join(s['workdir'], 'metrics.jsonl')}"


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Validation loss of the latest checkpoint in workdir."""
    compile_cache.enable(config.train.compilation_cache_dir)
    _, val_ds = _datasets(config)
    val_batches = list(itertools.islice(iter(val_ds), config.train.eval_batches))
    runtime = runtime_lib.build(config)
    ckpt = Checkpointer(workdir)
    step = ckpt.latest_step()
    with jax.set_mesh(runtime.mesh), compile_cache.kept_out(runtime.mesh):
        state = ckpt.restore(step, runtime.abstract_state())
        result = _evaluate(runtime.eval_step, state, [runtime.batch(b) for b in val_batches])
    ckpt.close()
    return {"step": step, **result}
