"""Permute: token rows into capacity slots, the Pallas twin of dispatch.dispatch.

Forward: invert the assignment -> slot map (slot_sources), then one row gather writes
every slot exactly once (empty slots as zeros), so no zero-filled buffer is needed first.
Backward: a token's gradient is the sum of the gradients of the slots its assignments
fill, a k-way gather-sum through the same slot map (deterministic, no scatter-add).
"""

from __future__ import annotations

import functools

import jax

from skymoe_jax.kernels.common import resolve_interpret
from skymoe_jax.kernels.gather import gather_rows, gather_sum, slot_sources


def dispatch(x: jax.Array, slots: jax.Array, num_slots: int, *, interpret: bool | None = None) -> jax.Array:
    """Token rows x [S, d] -> slot rows [num_slots, d]; slots [S, k] holds each assignment's slot or -1."""
    return _dispatch(num_slots, resolve_interpret(interpret), x, slots)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _dispatch(num_slots: int, interpret: bool, x: jax.Array, slots: jax.Array) -> jax.Array:
    return gather_rows(x, slot_sources(slots, num_slots, interpret=interpret), slots.shape[1], interpret=interpret)


def _dispatch_fwd(num_slots: int, interpret: bool, x: jax.Array, slots: jax.Array):
    return _dispatch(num_slots, interpret, x, slots), slots


def _dispatch_bwd(num_slots: int, interpret: bool, slots: jax.Array, d_out: jax.Array):
    return gather_sum(d_out, slots, interpret=interpret), None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)
