"""train(): the whole run, top to bottom. Also evaluate() for `skymoe eval`."""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from skymoe_jax.checkpoint.manager import Checkpointer
from skymoe_jax.data.pipeline import make_dataset
from skymoe_jax.data.sources import load_documents
from skymoe_jax.data.tokenizers import make_tokenizer
from skymoe_jax.errors import DataError
from skymoe_jax.metrics.flops import flops_per_token
from skymoe_jax.metrics.writers import Console, JsonlWriter
from skymoe_jax.model.spec import ModelSpec
from skymoe_jax.training import state as state_lib
from skymoe_jax.training.step import make_eval_step, make_train_step


def _datasets(config: ml_collections.ConfigDict):
    tokenizer = make_tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise DataError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                        f"{config.model.vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size}")
    train_docs, val_docs = load_documents(config.data, tokenizer)
    seed = config.data.shuffle_seed
    return (make_dataset(train_docs, config.data, seed=seed, process_index=jax.process_index(),
                         process_count=jax.process_count()),
            make_dataset(val_docs, config.data, seed=seed + 1, process_index=jax.process_index(),
                         process_count=jax.process_count()))


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
    return "  ".join(parts)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train (or resume) in workdir; returns the final summary. Writes WORKDIR/metrics.jsonl."""
    t = config.train
    train_ds, val_ds = _datasets(config)  # bad data stops here, before anything is written
    os.makedirs(workdir, exist_ok=True)
    val_batches = list(itertools.islice(iter(val_ds), t.eval_batches))
    train_iter = iter(train_ds)

    graphdef, init, tx = state_lib.create(config)
    ckpt = Checkpointer(workdir, t.checkpoint_every, t.keep_checkpoints)
    start = ckpt.latest_step() or 0
    state = ckpt.restore(start, jax.eval_shape(init), train_iter) if start else init()

    train_step = jax.jit(make_train_step(graphdef, tx, config), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(graphdef))
    tokens_per_step = config.data.batch_size * config.data.seq_len
    spec = ModelSpec.from_config(config)
    writer = JsonlWriter(os.path.join(workdir, "metrics.jsonl"))
    console = Console(t.steps, start, progress_bar=t.progress)
    console.print(f"{config.name}: {spec.num_layers} layers, {spec.num_experts or 'no'} experts, "
                  f"{flops_per_token(spec, config.data.seq_len) / 1e6:.1f} MFLOP/token; workdir {workdir}"
                  + (f"; resuming at step {start}" if start else ""))

    compile_start = time.perf_counter()
    first = next(train_iter)
    train_step = train_step.lower(state, first).compile()
    compile_s = time.perf_counter() - compile_start
    pending, last_time, last_step, record, evals = first, time.perf_counter(), start, None, {}
    for step in range(start + 1, t.steps + 1):
        batch = pending if pending is not None else next(train_iter)
        pending = None
        state, metrics = train_step(state, batch)
        if step % t.log_every == 0 or step == t.steps:
            record = {"step": step, **jax.device_get(metrics)}
            now = time.perf_counter()
            record["tokens_per_sec"] = (step - last_step) * tokens_per_step / (now - last_time)
            last_time, last_step = now, step
            if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
                evals = _evaluate(eval_step, state.params, val_batches)
                record.update(evals)
                console.print(f"step {step}: {_live(record)}  eval loss {evals['eval_loss']:.3f}")
                last_time = time.perf_counter()  # eval time is not training throughput
            writer.write(record)
            console.update(step, _live(record))
        ckpt.save(step, state, train_iter, config, force=step == t.steps)
    ckpt.close()
    writer.close()
    console.close()

    summary = {"steps": t.steps, "compile_s": compile_s, "workdir": workdir}
    if record is not None:
        summary.update(loss=float(record["loss"]), tokens_per_sec=float(record["tokens_per_sec"]), **evals)
        if "drop_rate" in record:
            summary.update(drop_rate=np.asarray(record["drop_rate"]).tolist(),
                           alpha=np.asarray(record["alpha"]).tolist())
    console.print(summary_line(summary))
    return summary


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
    parts.append(f"compile {s['compile_s']:.0f}s")
    return ", ".join(parts) + f"; metrics in {os.path.join(s['workdir'], 'metrics.jsonl')}"


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Validation loss of the latest checkpoint in workdir."""
    _, val_ds = _datasets(config)
    val_batches = list(itertools.islice(iter(val_ds), config.train.eval_batches))
    graphdef, init, _ = state_lib.create(config)
    ckpt = Checkpointer(workdir, 0, 0)
    step = ckpt.latest_step()
    state = ckpt.restore(step, jax.eval_shape(init))
    ckpt.close()
    result = _evaluate(jax.jit(make_eval_step(graphdef)), state.params, val_batches)
    return {"step": step, **result}
