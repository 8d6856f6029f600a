"""`skymoe bench step`: step time, tokens/s, achieved FLOP/s and MFU of the train
step on this device, and the MoE overhead against a dense model with the same
activated FLOPs. Inputs are random tokens, so the data pipeline is not measured."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from skymoe_jax.metrics.flops import device_peak_flops, flops_per_token, param_counts
from skymoe_jax.model.spec import ModelSpec
from skymoe_jax.run.host_memory import release_free_heap
from skymoe_jax.training import runtime as runtime_lib


def measured_matmul_peak(dtype: str, size: int | None = None, repeats: int = 5) -> float:
    """Best FLOP/s of a square matmul in the model's compute dtype on the default device."""
    on_cpu = jax.devices()[0].platform == "cpu"
    n = size or (1024 if on_cpu else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype))
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best = min(_timed(lambda: matmul(a, b).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def dense_twin(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same model with every FFN dense and as wide as the activated expert width on average."""
    spec = ModelSpec.from_config(config)
    twin = copy.deepcopy(config)
    n_moe = spec.num_moe_layers
    width = ((spec.num_layers - n_moe) * spec.ffn_dim + n_moe * spec.top_k * spec.expert_ffn_dim) / spec.num_layers
    twin.model.ffn_dim = int(round(width))
    twin.moe.num_experts = 0
    return twin


def random_tokens(config: ml_collections.ConfigDict) -> np.ndarray:
    """Token ids [batch, seq + 1] (inputs and their next tokens), the same for every caller."""
    b, s, v = config.data.batch_size, config.data.seq_len, config.model.vocab_size
    return np.random.default_rng(0).integers(0, v, (b, s + 1), dtype=np.int32)


def skymoe_step_fn(config: ml_collections.ConfigDict, tokens: np.ndarray) -> tuple[Callable[[], None], float]:
    """(a function running one compiled train step on tokens and waiting for it, the compile seconds)."""
    runtime = runtime_lib.build(config)
    b, s = tokens.shape[0], tokens.shape[1] - 1
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
        "segment_ids": np.ones((b, s), np.int32),
        "loss_mask": np.ones((b, s), np.float32),
    }
    with jax.set_mesh(runtime.mesh):
        state, batch = runtime.init(), runtime.batch(batch)
        start = time.perf_counter()
        compiled = runtime.train_step.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
    release_free_heap()  # as skymoe train does after compiling
    held = {"state": state}

    def step() -> None:
        with jax.set_mesh(runtime.mesh):
            held["state"], metrics = compiled(held["state"], batch)
            jax.block_until_ready(metrics)

    return step, compile_s


def time_steps(config: ml_collections.ConfigDict, steps: int) -> dict[str, float]:
    """Median seconds per train step (after compile) on random tokens, and the compile time."""
    step, compile_s = skymoe_step_fn(config, random_tokens(config))
    step()  # warm-up
    times = [_timed(step) for _ in range(steps)]
    return {"step_s": float(np.median(times)), "compile_s": compile_s}


def step_benchmark(config: ml_collections.ConfigDict, steps: int = 10) -> dict[str, Any]:
    spec = ModelSpec.from_config(config)
    device = jax.devices()[0]
    tokens = config.data.batch_size * config.data.seq_len
    flops_tok = flops_per_token(spec, config.data.seq_len, param_counts(spec))
    moe = time_steps(config, steps)
    achieved = tokens * flops_tok / moe["step_s"]
    peak = measured_matmul_peak(config.model.dtype)
    result: dict[str, Any] = {
        "device": device.device_kind,
        "platform": device.platform,
        "config": config.name,
        "tokens_per_step": tokens,
        "step_s": moe["step_s"],
        "compile_s": moe["compile_s"],
        "tokens_per_sec": tokens / moe["step_s"],
        "flops_per_token": flops_tok,
        "achieved_flops": achieved,
        "measured_peak_flops": peak,
        "mfu_measured_peak": achieved / peak,
    }
    table_peak = device_peak_flops(device)
    if table_peak:
        result["mfu_table_peak"] = achieved / table_peak
    summary = (
        f"{config.name} on {device.device_kind}: {1e3 * moe['step_s']:.1f} ms/step, "
        f"{tokens / moe['step_s']:,.0f} tokens/s, {achieved / 1e12:.3f} TFLOP/s achieved, "
        f"MFU {100 * achieved / peak:.1f}% of a measured {peak / 1e12:.3f} TFLOP/s {config.model.dtype} matmul"
    )
    if table_peak:
        summary += f" ({100 * achieved / table_peak:.1f}% of the {table_peak / 1e12:.0f} TFLOP/s data-sheet peak)"
    if spec.num_experts:
        dense = time_steps(dense_twin(config), steps)
        result["dense_step_s"] = dense["step_s"]
        result["moe_overhead"] = moe["step_s"] / dense["step_s"]
        summary += (
            f"; MoE overhead {moe['step_s'] / dense['step_s']:.2f}x the step time of a dense model "
            f"with the same activated FLOPs ({1e3 * dense['step_s']:.1f} ms/step)"
        )
    result["summary"] = summary
    return result
