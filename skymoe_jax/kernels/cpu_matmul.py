"""The weight gradient of a batched matmul on the CPU, through a small compiled kernel (cpu_matmul.cc).

`trans_a_matmul(x, g)` is `einsum("bcm,bcn->bmn", x, g)`. On the CPU it calls OpenBLAS through `jax.ffi`, one
single-threaded sgemm per batch entry on XLA's intra-op pool; everywhere else, and on a CPU where the kernels
cannot be built or loaded (kernels/cpu_ffi.py), it is the einsum. The expert FFN's backward takes its three
weight gradients from it: XLA gives that dot to Eigen, 30-40% slower per core than OpenBLAS on these shapes
(docs/BENCHMARKS.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from skymoe_jax.kernels import cpu_ffi
from skymoe_jax.kernels.common import vary_like

TARGET = "skymoe_trans_a_matmul"


def _einsum(x: jax.Array, g: jax.Array) -> jax.Array:
    return jnp.einsum("bcm,bcn->bmn", x, g)


def _kernel(x: jax.Array, g: jax.Array, used: jax.Array) -> jax.Array:
    # Inside shard_map the call's result varies over no mesh axis, and in a backward pass (where the mesh is not
    # in context) out_struct cannot declare it to; it is cast to its operands' axes after the call instead.
    out_type = jax.ShapeDtypeStruct((x.shape[0], x.shape[2], g.shape[2]), jnp.float32)
    return vary_like(jax.ffi.ffi_call(TARGET, out_type)(x, g, used), x, g, used)


def trans_a_matmul(x: jax.Array, g: jax.Array, used: jax.Array | None = None) -> jax.Array:
    """x [B, C, M], g [B, C, N] -> [B, M, N] = x[b]^T g[b]: the compiled kernel for float32 on the CPU, the
    einsum otherwise (other platforms and dtypes, empty operands). used [B, K] (optional, int32) splits each
    entry's C rows into K equal runs of which only the first used[b, k] rows may be non-zero: the kernel skips the
    others, the einsum sums them as they are."""
    if x.ndim != 3 or g.ndim != 3 or x.shape[:2] != g.shape[:2]:
        raise ValueError(f"trans_a_matmul takes [B, C, M] and [B, C, N]; got {x.shape} and {g.shape}")
    if used is not None and (used.ndim != 2 or used.shape[0] != x.shape[0] or x.shape[1] % used.shape[1]):
        raise ValueError(f"trans_a_matmul's used must be [B, K] with K dividing C = {x.shape[1]}; got {used.shape}")
    if cpu_ffi.usable(x, g):
        full = jnp.full((x.shape[0], 1), x.shape[1], jnp.int32)
        return _kernel(x, g, full if used is None else used.astype(jnp.int32))
    return _einsum(x, g)
