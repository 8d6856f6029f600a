"""The SwiGLU experts on the CPU, through a compiled kernel (cpu_expert_ffn.cc; built and loaded by cpu_ffi.py): the
forward, and the backward with the weight gradients.

The experts' rows come in one of two layouts, told apart by the counts: slot buffers x [E, C, d] with the rows in
use of each of K runs, used [E, K] (an expert's slots in a routing group fill from the first; the rest are
skipped), or the assignments sorted by expert x [A, d] with group sizes [E] (dropless: every row is computed,
none is padding). Each (expert, block of up to 256 of its rows) is a task on XLA's intra-op pool (in the backward,
each expert, its blocks in turn): single-threaded OpenBLAS sgemms with the SwiGLU, or its gradient, applied to the
block between them while it is in cache, where XLA makes each elementwise step a pass over the whole [E, C, f]
buffer; the backward adds the block's share of the weight gradients while it is still there (docs/BENCHMARKS.md).
model/moe/experts.py calls these for float32 on the CPU (`cpu_ffi.usable`) and keeps XLA's ops elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from skymoe_jax.kernels import cpu_ffi
from skymoe_jax.kernels.common import vary_like

FORWARD, BACKWARD = "skymoe_expert_ffn_fwd", "skymoe_expert_ffn_bwd"


def _types(rows: tuple[int, ...], *widths: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    return tuple(jax.ShapeDtypeStruct((*rows, w), jnp.float32) for w in widths)


def _check_counts(x: jax.Array, counts: jax.Array) -> None:
    slots = x.ndim == 3 and counts.ndim == 2 and counts.shape[0] == x.shape[0] and x.shape[1] % counts.shape[1] == 0
    if not (slots or (x.ndim == 2 and counts.ndim == 1)):
        raise ValueError(
            f"the expert kernels take x [E, C, d] with used [E, K], or x [A, d] with group sizes [E]; "
            f"got {x.shape} and {counts.shape}"
        )


def forward(
    w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, x: jax.Array, counts: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [E, C, d] or [A, d], w_gate and w_up [E, d, f], w_down [E, f, d] -> (y like x, gate and up like x with
    width f): gate = x w_gate, up = x w_up, y = (silu(gate) * up) w_down per expert. counts (int32): with slot
    buffers, used [E, K]: each expert's C rows are K equal runs of which the first used[e, k] are in use, the
    other rows must be zero and come out zero; with sorted rows, group sizes [E] (rows past their sum come out
    zero)."""
    cpu_ffi.require("expert_ffn forward")
    _check_counts(x, counts)
    d, f = x.shape[-1], w_gate.shape[2]
    outs = jax.ffi.ffi_call(FORWARD, _types(x.shape[:-1], d, f, f))(x, w_gate, w_up, w_down, counts)
    # Inside shard_map a call's results vary over no mesh axis; they vary like the operands (cpu_matmul.py).
    return tuple(vary_like(a, x, w_gate, w_up, w_down, counts) for a in outs)


def backward(
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    x: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    dy: jax.Array,
    counts: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """From the forward's input x, its gate and up and the output's gradient dy (like x; zero on the rows not in
    use): (dx like x, and the weights' gradients like w_gate, w_up and w_down), each expert's weight gradients
    summed over its rows. counts as in `forward`."""
    cpu_ffi.require("expert_ffn backward")
    _check_counts(dy, counts)
    shapes = (dy.shape, w_gate.shape, w_up.shape, w_down.shape)
    out_types = tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)
    outs = jax.ffi.ffi_call(BACKWARD, out_types)(dy, x, w_gate, w_up, w_down, gate, up, counts)
    return tuple(vary_like(a, dy, x, w_gate, w_up, w_down, gate, up, counts) for a in outs)
