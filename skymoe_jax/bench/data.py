"""`skymoe bench data`: tokens/s of the input pipeline alone, as `skymoe train` builds it, in this process
and with grain worker processes, against the tokens/s of the train step that consumes it."""

from __future__ import annotations

import math
import time
from typing import Any

import grain
import jax
import ml_collections

from skymoe_jax.bench.step import measured_matmul_peak, time_steps
from skymoe_jax.data.inputs import make_datasets
from skymoe_jax.metrics.flops import PEAK_FLOPS, flops_per_token
from skymoe_jax.model.spec import ModelSpec

# Steps estimated to take longer than this on the local device are not timed: a GPU config on a CPU.
MAX_STEP_SECONDS = 20.0


def batches_per_window(data: ml_collections.ConfigDict) -> int:
    """Batches that drain one shuffle window. The window is filled all at once when it runs empty, so
    only whole windows measure the steady rate (part of one measures the buffer or the refill)."""
    window = data.shuffle_window // data.num_streams
    rows = data.batch_size // data.num_streams
    return max(1, math.ceil(window / rows)) if window > 1 else 1


def pipeline_tokens_per_sec(config: ml_collections.ConfigDict, batches: int, workers: int = 0) -> float:
    """Training batches per second from a fresh iterator (the first window's fill included), in tokens."""
    train, _ = make_datasets(config)
    if workers:
        _allow_grain_workers()
        train = train.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    start = time.perf_counter()
    iterator = iter(train)
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    if workers:
        iterator.close()  # stops the worker processes now rather than at garbage collection
    return batches * config.data.batch_size * config.data.seq_len / seconds


def _allow_grain_workers() -> None:
    # grain 0.2.18's mp_prefetch reads an absl flag and raises unless absl flags were parsed; skymoe parses
    # its own flags, so mark absl's as parsed (their defaults).
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _step_rate(config: ml_collections.ConfigDict, given: float) -> tuple[float | None, str]:
    """The train step's tokens/s and where it came from; None, with the reason, when it was not timed."""
    if given:
        return given, "as given"
    tokens = config.data.batch_size * config.data.seq_len
    platform = jax.devices()[0].platform
    flops = tokens * flops_per_token(ModelSpec.from_config(config), config.data.seq_len)
    estimate = flops / measured_matmul_peak(config.model.dtype)
    if estimate > MAX_STEP_SECONDS:
        return None, f"not timed on this {platform} (about {estimate:,.0f} s per step)"
    return tokens / time_steps(config, steps=3)["step_s"], f"measured on this {platform}"


def data_benchmark(
    config: ml_collections.ConfigDict, batches: int, workers: int, step_tokens_per_sec: float = 0.0
) -> dict[str, Any]:
    """Pipeline rates and the step rate they feed; `summary` says which is faster and by how much."""
    per_window = batches_per_window(config.data)
    batches = per_window * math.ceil(batches / per_window)
    result: dict[str, Any] = {
        "config": config.name,
        "source": config.data.source,
        "batches": batches,
        "shuffle_windows": batches // per_window,
        "pipeline_tokens_per_sec": pipeline_tokens_per_sec(config, batches),
    }
    parts = [
        f"{config.name} ({config.data.source} data, {config.data.batch_size}x{config.data.seq_len} tokens "
        f"per batch): input pipeline {result['pipeline_tokens_per_sec']:,.0f} tokens/s in this process"
    ]
    if workers:
        result["workers"] = workers
        result["pipeline_workers_tokens_per_sec"] = pipeline_tokens_per_sec(config, batches, workers)
        parts.append(f"{result['pipeline_workers_tokens_per_sec']:,.0f} tokens/s with {workers} grain worker processes")
    parts[-1] += f" ({batches} batches, {result['shuffle_windows']} shuffle windows)"
    fastest = max(result["pipeline_tokens_per_sec"], result.get("pipeline_workers_tokens_per_sec", 0.0))

    rate, result["step_source"] = _step_rate(config, step_tokens_per_sec)
    if rate:
        result["step_tokens_per_sec"] = rate
        parts.append(
            f"train step {rate:,.0f} tokens/s ({result['step_source']}): the pipeline is "
            f"{fastest / rate:,.1f}x the step's rate"
        )
    else:
        # What one H100 could consume at most: every FLOP of its data-sheet peak spent on this model.
        bound = PEAK_FLOPS["h100"] / flops_per_token(ModelSpec.from_config(config), config.data.seq_len)
        result["h100_full_mfu_tokens_per_sec"] = bound
        parts.append(
            f"train step {result['step_source']} and no GPU step rate was measured (pass "
            "--step_tokens_per_sec from skymoe bench step on a GPU); an H100 at 100% MFU would take "
            f"{bound:,.0f} tokens/s, and the pipeline delivers {fastest / bound:.1f}x that"
        )
    result["summary"] = "; ".join(parts)
    return result
