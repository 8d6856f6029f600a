"""Weight gradients on the CPU, through a small compiled kernel (cpu_matmul.cc).

`trans_a_matmul(x, g)` is `einsum("bcm,bcn->bmn", x, g)` on slot buffers, and on rows sorted by expert with group
sizes it is the grouped form, each expert's rows contracted (`jax.lax.ragged_dot_general`). On the CPU it calls
OpenBLAS through `jax.ffi`, single-threaded sgemms per expert on XLA's intra-op pool; everywhere else, and on a
CPU where the kernels cannot be built or loaded (kernels/cpu_ffi.py), it is XLA's op. XLA's CPU backend runs
that dot either on Eigen, 30-40% slower per core than OpenBLAS, or as a transposed copy of x and a YNNPACK dot
(docs/BENCHMARKS.md). `weight_gradient` is a dense layer's (model/layers.py's `project`, the output head): on one
device through the kernel. The experts' FFN sums its weight gradients in its own backward kernel on the CPU
(cpu_expert_ffn.py) and takes them from here only elsewhere, as XLA's ops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from skymoe_jax.kernels import cpu_ffi
from skymoe_jax.kernels.common import vary_like

TARGET = "skymoe_trans_a_matmul"


def _einsum(x: jax.Array, g: jax.Array) -> jax.Array:
    return jnp.einsum("bcm,bcn->bmn", x, g)


def _grouped(x: jax.Array, g: jax.Array, group_sizes: jax.Array) -> jax.Array:
    dims = jax.lax.RaggedDotDimensionNumbers((([0], [0]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    return jax.lax.ragged_dot_general(x, g, group_sizes, dims)


def _kernel(x: jax.Array, g: jax.Array, counts: jax.Array) -> jax.Array:
    # Inside shard_map the call's result varies over no mesh axis, and in a backward pass (where the mesh is not
    # in context) out_struct cannot declare it to; it is cast to its operands' axes after the call instead.
    out_type = jax.ShapeDtypeStruct((counts.shape[0], x.shape[-1], g.shape[-1]), jnp.float32)
    return vary_like(jax.ffi.ffi_call(TARGET, out_type)(x, g, counts), x, g, counts)


def trans_a_matmul(x: jax.Array, g: jax.Array, counts: jax.Array | None = None) -> jax.Array:
    """Slot buffers x [B, C, M], g [B, C, N] -> [B, M, N] = x[b]^T g[b]; counts [B, K] (optional, int32) splits
    each entry's C rows into K equal runs of which only the first counts[b, k] rows may be non-zero: the kernel
    skips the others, the einsum sums them as they are. Or rows sorted by expert x [A, M], g [A, N] with group
    sizes counts [E] -> [E, M, N], expert e's rows contracted (rows past the sizes' sum count for none). The
    compiled kernel for float32 on the CPU, XLA's op otherwise (other platforms and dtypes, empty operands)."""
    if x.ndim == 2 and g.ndim == 2 and x.shape[0] == g.shape[0] and counts is not None and counts.ndim == 1:
        if cpu_ffi.usable(x, g):
            return _kernel(x, g, counts.astype(jnp.int32))
        return _grouped(x, g, counts.astype(jnp.int32))
    if x.ndim != 3 or g.ndim != 3 or x.shape[:2] != g.shape[:2]:
        raise ValueError(
            f"trans_a_matmul takes [B, C, M] and [B, C, N], or [A, M] and [A, N] with group sizes [E]; got "
            f"{x.shape} and {g.shape}"
        )
    if counts is not None and (counts.ndim != 2 or counts.shape[0] != x.shape[0] or x.shape[1] % counts.shape[1]):
        raise ValueError(f"trans_a_matmul's used must be [B, K] with K dividing C = {x.shape[1]}; got {counts.shape}")
    if cpu_ffi.usable(x, g):
        full = jnp.full((x.shape[0], 1), x.shape[1], jnp.int32)
        return _kernel(x, g, full if counts is None else counts.astype(jnp.int32))
    return _einsum(x, g)


def on_one_device(*operands: jax.Array) -> bool:
    """Whether `weight_gradient` runs the kernel for these operands: `cpu_ffi.usable` and no mesh of several
    devices in context (jax.set_mesh, as the runtime traces its steps), whose partitioner would gather a call's
    operands onto every device."""
    return cpu_ffi.usable(*operands) and jax.sharding.get_abstract_mesh().size <= 1


def weight_gradient(x: jax.Array, g: jax.Array) -> jax.Array:
    """x [..., M], g [..., N] -> [M, N] = x^T g summed over every leading axis (float32): a dense layer's weight
    gradient. The compiled kernel on one CPU device (`on_one_device`), where XLA runs this dot as a transposed
    copy of x and a YNNPACK dot (docs/BENCHMARKS.md); XLA's op elsewhere."""
    if on_one_device(x, g):
        return trans_a_matmul(x.reshape(1, -1, x.shape[-1]), g.reshape(1, -1, g.shape[-1]))[0]
    return jnp.einsum("...m,...n->mn", x, g, preferred_element_type=jnp.float32)
