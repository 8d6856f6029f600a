"""The SwiGLU experts on slot buffers on the CPU, through a compiled kernel (cpu_expert_ffn.cc; built and loaded by
cpu_ffi.py): the forward, and the backward up to the weight gradients (which are cpu_matmul.py's).

Only the slot rows in use are computed (an expert's slots in a routing group fill from the first; `used` counts
them). Each (expert, block of up to 128 slot rows) is a task on XLA's intra-op pool: single-threaded OpenBLAS
sgemms with the SwiGLU, or its gradient, applied to the block between them while it is in cache, where XLA makes
each elementwise step a pass over the whole [E, C, f] buffer (docs/BENCHMARKS.md). model/moe/experts.py calls
these for float32 on the CPU (`cpu_ffi.usable`) and keeps its einsums elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from skymoe_jax.kernels import cpu_ffi
from skymoe_jax.kernels.common import vary_like

FORWARD, BACKWARD = "skymoe_expert_ffn_fwd", "skymoe_expert_ffn_bwd"


def _types(*shapes: tuple[int, ...]) -> tuple[jax.ShapeDtypeStruct, ...]:
    return tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)


def forward(
    w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, x: jax.Array, used: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [E, C, d], w_gate and w_up [E, d, f], w_down [E, f, d] -> (y [E, C, d], gate, up [E, C, f]):
    gate = x w_gate, up = x w_up, y = (silu(gate) * up) w_down per expert. used [E, K] int32: each expert's C rows
    are K equal runs of which the first used[e, k] are in use; the other rows must be zero, and come out zero."""
    cpu_ffi.require("expert_ffn forward")
    e, c, d = x.shape
    f = w_gate.shape[2]
    outs = jax.ffi.ffi_call(FORWARD, _types((e, c, d), (e, c, f), (e, c, f)))(x, w_gate, w_up, w_down, used)
    # Inside shard_map a call's results vary over no mesh axis; they vary like the operands (cpu_matmul.py).
    return tuple(vary_like(a, x, w_gate, w_up, w_down, used) for a in outs)


def backward(
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    dy: jax.Array,
    used: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """From the forward's gate and up and the output's gradient dy [E, C, d] (zero on the rows not in use): (dx
    [E, C, d], d_gate, d_up, h [E, C, f]), h = silu(gate) * up, for the weight gradients x^T d_gate, x^T d_up and
    h^T dy."""
    cpu_ffi.require("expert_ffn backward")
    e, c, d = dy.shape
    f = gate.shape[2]
    outs = jax.ffi.ffi_call(BACKWARD, _types((e, c, d), (e, c, f), (e, c, f), (e, c, f)))(
        dy, w_gate, w_up, w_down, gate, up, used
    )
    return tuple(vary_like(a, dy, w_gate, w_up, w_down, gate, up, used) for a in outs)
