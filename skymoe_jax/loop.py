"""train(): the whole run, top to bottom. Also evaluate() for `skymoe eval`."""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from skymoe_jax.checkpoint.initial import initial_state
from skymoe_jax.checkpoint.manager import Checkpointer
from skymoe_jax.data.inputs import make_datasets
from skymoe_jax.errors import TrainingError
from skymoe_jax.metrics.flops import (flops_per_token, mfu, peak_flops, pipeline_utilization,
                                      stage_flops_per_token)
from skymoe_jax.metrics.similarity import similarity_fn
from skymoe_jax.metrics.tensorboard import TensorBoardWriter
from skymoe_jax.metrics.writers import Console, JsonlWriter
from skymoe_jax.model.spec import ModelSpec
from skymoe_jax.model.pipeline import bubble_fraction
from skymoe_jax.training import runtime as runtime_lib
from skymoe_jax.training.preemption import StopSignals


def _datasets(config: ml_collections.ConfigDict):
    return make_datasets(config, process_index=jax.process_index(), process_count=jax.process_count())


def _evaluate(eval_step, params, batches) -> dict[str, Any]:
    """Token-weighted CE over the cached validation batches, and mean eval drop rate per layer."""
    results = [eval_step(params, b) for b in batches]
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
    runtime = runtime_lib.build(config)  # a mesh that does not fit stops here
    train_ds, val_ds = _datasets(config)  # and bad data here, before anything is written
    os.makedirs(workdir, exist_ok=True)
    val_batches = list(itertools.islice(iter(val_ds), t.eval_batches))
    train_iter = iter(train_ds)
    with jax.set_mesh(runtime.mesh):
        return _train(config, workdir, runtime, train_iter, [runtime.batch(b) for b in val_batches])


def _train(config, workdir, runtime, train_iter, val_batches) -> dict[str, Any]:
    t = config.train
    ckpt = Checkpointer(workdir, t.checkpoint_every, t.keep_checkpoints, t.keep_every, create=True)
    latest = ckpt.latest_step()
    if latest is None:
        state, origin = initial_state(config, runtime)
    else:
        state, origin = ckpt.restore(latest, runtime.abstract_state(), train_iter), f"resuming at step {latest}"
    start = latest or 0
    tokens_per_step = config.data.batch_size * config.data.seq_len
    spec = ModelSpec.from_config(config)
    writers = [JsonlWriter(os.path.join(workdir, "metrics.jsonl"))]
    if config.metrics.tensorboard:
        writers.append(TensorBoardWriter(os.path.join(workdir, "tensorboard")))
    console = Console(t.steps, start, progress_bar=t.progress)
    flops_tok = flops_per_token(spec, config.data.seq_len)
    peak = peak_flops(config.metrics.peak_flops_per_device)
    similarity = similarity_fn(spec, runtime.mesh) if spec.num_experts else None
    similarity_every = config.metrics.similarity_every if similarity else 0
    console.print(f"{config.name}: {spec.num_layers} layers, {spec.num_experts or 'no'} experts, "
                  f"{flops_tok / 1e6:.1f} MFLOP/token; {origin}; workdir {workdir}")
    console.print(whoami(runtime))
    if spec.pipelined:
        console.print(pipeline_summary(spec, config))

    compile_start = time.perf_counter()
    batch = runtime.batch(next(train_iter))
    train_step = runtime.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - compile_start
    last_time, last_step, record, evals, skipped = time.perf_counter(), start, None, {}, 0
    unchecked: list[tuple[int, jax.Array]] = []  # (step, finite flag) not yet read back from the device
    try:
        with StopSignals(t.stop_check_every) as signals:
            for step in range(start + 1, t.steps + 1):
                if step > start + 1:
                    batch = runtime.batch(next(train_iter))
                state, metrics = train_step(state, batch)
                unchecked.append((step, metrics["finite"]))
                eval_now = t.eval_every and (step % t.eval_every == 0 or step == t.steps)
                similarity_now = similarity_every and (step % similarity_every == 0 or step == t.steps)
                save_now = ckpt.due(step) or step == t.steps
                stop_now = signals.requested(step)
                if step % t.log_every == 0 or eval_now or save_now or stop_now or step == t.steps:
                    skipped += _check_finite(unchecked, t.nonfinite, ckpt, workdir)
                    unchecked = []
                if step % t.log_every == 0 or eval_now or similarity_now or step == t.steps:
                    record = {"step": step, **jax.device_get(metrics)}
                    del record["finite"]
                    now = time.perf_counter()
                    record["tokens_per_sec"] = (step - last_step) * tokens_per_step / (now - last_time)
                    if peak:
                        record["mfu"] = mfu(record["tokens_per_sec"] / runtime.mesh.size, flops_tok, peak)
                    record["skipped_steps"] = skipped
                    last_time, last_step = now, step
                    if similarity_now:
                        record["expert_similarity"] = jax.device_get(similarity(state.params))
                    if eval_now:
                        evals = _evaluate(runtime.eval_step, state.params, val_batches)
                        record.update(evals)
                        console.print(f"step {step}: {_live(record)}  eval loss {evals['eval_loss']:.3f}")
                    if eval_now or similarity_now:
                        last_time = time.perf_counter()  # eval and similarity time is not training throughput
                    for writer in writers:
                        writer.write(record)
                    console.update(step, _live(record))
                if save_now or stop_now:
                    ckpt.save(step, state, config, train_iter)
                if stop_now:
                    ckpt.wait()
                    console.print(f"stopped by {signals.signal_name or 'another process'} after step {step}; "
                                  f"saved checkpoint {ckpt.path(step)}; run the same command to resume")
                    return {"steps": step, "stopped": True, "workdir": workdir}
    finally:
        ckpt.close()
        for writer in writers:
            writer.close()
        console.close()

    summary = {"steps": t.steps, "compile_s": compile_s, "workdir": workdir, "skipped_steps": skipped}
    if record is not None:
        summary.update(loss=float(record["loss"]), tokens_per_sec=float(record["tokens_per_sec"]), **evals)
        if "mfu" in record:
            summary["mfu"] = float(record["mfu"])
        if "drop_rate" in record:
            summary.update(drop_rate=np.asarray(record["drop_rate"]).tolist(),
                           alpha=np.asarray(record["alpha"]).tolist())
    console.print(summary_line(summary))
    return summary


def _check_finite(unchecked: list[tuple[int, jax.Array]], policy: str, ckpt: Checkpointer, workdir: str) -> int:
    """Number of skipped (non-finite) steps among `unchecked`; raises under the `stop` policy."""
    bad = [step for step, finite in unchecked if not bool(finite)]
    if bad and policy == "stop":
        kept = ckpt.latest_step()
        where = f"the last checkpoint, step {kept} in {ckpt.directory}, is untouched" if kept else \
            "no checkpoint was written"
        raise TrainingError(f"non-finite loss or gradients at step {bad[0]} (its update was not applied); "
                            f"stopped: {where}. Set --config.train.nonfinite=skip to skip such steps instead")
    return len(bad)


def whoami(runtime: runtime_lib.Runtime) -> str:
    """Where this run is: one process per node that owns a single GPU of eight shows as 1 local device."""
    device = jax.devices()[0]
    mesh = "x".join(str(n) for n in runtime.mesh.shape.values())
    return (f"devices: {device.platform} ({device.device_kind}), process {jax.process_index()} of "
            f"{jax.process_count()}, {jax.local_device_count()} local / {jax.device_count()} global; mesh {mesh} "
            f"(pipeline x data x expert, layout {runtime.layout})")


def pipeline_summary(spec: ModelSpec, config: ml_collections.ConfigDict) -> str:
    per_stage = stage_flops_per_token(spec, config.data.seq_len, spec.stage_layers)
    m = config.parallel.num_microbatches
    return (f"pipeline: stages {spec.stage_layers}, {m} microbatches; training MFLOP/token by stage "
            f"[{', '.join(f'{f / 1e6:.2f}' for f in per_stage)}] (head on the last); bubble "
            f"{100 * bubble_fraction(len(per_stage), m):.1f}% for equal stages, "
            f"{100 * (1 - pipeline_utilization(per_stage, m)):.1f}% with this split's imbalance")


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
    _, val_ds = _datasets(config)
    val_batches = list(itertools.islice(iter(val_ds), config.train.eval_batches))
    runtime = runtime_lib.build(config)
    ckpt = Checkpointer(workdir)
    step = ckpt.latest_step()
    with jax.set_mesh(runtime.mesh):
        state = ckpt.restore(step, runtime.abstract_state())
        result = _evaluate(runtime.eval_step, state.params, [runtime.batch(b) for b in val_batches])
    ckpt.close()
    return {"step": step, **result}
