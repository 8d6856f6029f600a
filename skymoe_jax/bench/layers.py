"""`skymoe bench layers`: where a train step's time goes. Each block of the config's model (attention
with its norm, the MoE layer or dense FFN with theirs, the head with the loss) is jitted alone and its
forward and backward timed on the config's per-device batch, beside a square matmul for scale."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from skymoe_jax.bench.step import measured_matmul_peak
from skymoe_jax.model.attention import Attention
from skymoe_jax.model.layers import Head, RMSNorm, SwiGLU
from skymoe_jax.model.loss import cross_entropy
from skymoe_jax.model.mesh_layout import MeshLayout
from skymoe_jax.model.moe.block import MoEBlock
from skymoe_jax.model.spec import ModelSpec


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def _forward_backward(build: Callable[[], nnx.Module], apply: Callable, x: jax.Array) -> Callable[[], Any]:
    """A function computing the gradient of sum(block(x)^2) with respect to the block's state and x."""
    graphdef, state = nnx.split(build())

    def loss(state, x):
        return jnp.sum(jnp.square(apply(nnx.merge(graphdef, state), x).astype(jnp.float32)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda: grad(state, x)


def layer_benchmark(config: ml_collections.ConfigDict, repeats: int = 10) -> dict[str, Any]:
    spec, layout = ModelSpec.from_config(config), MeshLayout.from_config(config).layout
    b, s, d = config.data.batch_size, config.data.seq_len, spec.d_model
    x = jax.random.normal(jax.random.key(0), (b, s, d), spec.compute_dtype)
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    segments = jnp.ones((b, s), jnp.int32)
    targets = {"targets": jnp.zeros((b, s), jnp.int32), "loss_mask": jnp.ones((b, s), jnp.float32)}
    rngs = lambda: nnx.Rngs(params=0)
    blocks = {
        "attention": (
            lambda: (RMSNorm(spec), Attention(spec, rngs(), layout)),
            lambda m, x: m[1](m[0](x), positions, segments),
        ),
        "head_and_loss": (
            lambda: (RMSNorm(spec), Head(spec, rngs())),
            lambda m, x: cross_entropy(m[1](m[0](x)), targets)[0],
        ),
    }
    if spec.num_moe_layers:
        blocks["moe"] = (
            lambda: (RMSNorm(spec), MoEBlock(spec, rngs(), layout)),
            lambda m, x: m[1](m[0](x), train=True)[0],
        )
    if spec.num_layers > spec.num_moe_layers:
        blocks["dense_ffn"] = (lambda: (RMSNorm(spec), SwiGLU(spec, spec.ffn_dim, rngs())), lambda m, x: m[1](m[0](x)))
    ms = {name: _median_ms(_forward_backward(build, apply, x), repeats) for name, (build, apply) in blocks.items()}
    dense_layers = spec.num_layers - spec.num_moe_layers
    per_step = (
        spec.num_layers * ms["attention"]
        + spec.num_moe_layers * ms.get("moe", 0.0)
        + dense_layers * ms.get("dense_ffn", 0.0)
        + ms["head_and_loss"]
    )
    peak = measured_matmul_peak(config.model.dtype)
    lines = [f"{config.name}: forward + backward per block, {b} x {s} tokens, median of {repeats}"]
    lines += [f"  {name:<14} {value:8.1f} ms" for name, value in ms.items()]
    lines.append(
        f"  blocks of one step: {per_step:.1f} ms ({spec.num_layers} attention, {spec.num_moe_layers} MoE, "
        f"{dense_layers} dense FFN, the head); square {config.model.dtype} matmul {peak / 1e9:.0f} GFLOP/s"
    )
    return {"ms": ms, "blocks_per_step_ms": per_step, "matmul_peak_flops": peak, "summary": "\n".join(lines)}
