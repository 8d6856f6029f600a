"""Combine: the weighted gather-sum of each token's slot outputs back to token order, the
Pallas twin of dispatch.combine.

Backward, all gathers (deterministic, no float atomics):
  d y[slot]  = w[t, j] * d out[t] for the assignment (t, j) filling the slot: a row gather
               through the inverse slot map, the transpose of the forward gather;
  d w[t, j]  = <d out[t], y[slot_tj]>: a gathered row dot product.
"""

from __future__ import annotations

import functools

import jax

from skymoe_jax.kernels.common import resolve_interpret
from skymoe_jax.kernels.gather import gather_dot, gather_rows, gather_sum, slot_sources


def combine(y: jax.Array, slots: jax.Array, weights: jax.Array, *, interpret: bool | None = None) -> jax.Array:
    """Slot outputs y [num_slots, d] -> out [S, d], out[t] = sum_j weights[t, j] * y[slots[t, j]] (slot -1: 0)."""
    return _combine(resolve_interpret(interpret), y, slots, weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _combine(interpret: bool, y: jax.Array, slots: jax.Array, weights: jax.Array) -> jax.Array:
    return gather_sum(y, slots, weights, interpret=interpret)


def _combine_fwd(interpret: bool, y: jax.Array, slots: jax.Array, weights: jax.Array):
    return _combine(interpret, y, slots, weights), (y, slots, weights)


def _combine_bwd(interpret: bool, residuals, d_out: jax.Array):
    y, slots, weights = residuals
    sources = slot_sources(slots, y.shape[0], interpret=interpret)
    d_y = gather_rows(d_out, sources, slots.shape[1], weights.reshape(-1), interpret=interpret)
    d_weights = gather_dot(d_out, y, slots, interpret=interpret).astype(weights.dtype)
    return d_y, None, d_weights


_combine.defvjp(_combine_fwd, _combine_bwd)
