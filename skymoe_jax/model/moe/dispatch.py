"""Token dispatch as pure functions: each assignment's slot in its expert, capacity
dropping, gather into expert buffers, and the weighted combine back to token order.

Memory stays linear in tokens: slots are computed by sorting the T*k assignments
(no [tokens, experts, capacity] one-hot), dispatch is a row gather and combine a
k-way gather-sum. An assignment is one (token, chosen expert) pair, token-major.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Slots(NamedTuple):
    positions: jax.Array  # [S, k] int32 rank of each assignment among those of its expert
    counts: jax.Array  # [E] int32 assignments per expert (before dropping)


def expert_positions(experts: jax.Array, num_experts: int, priority: jax.Array | None = None) -> Slots:
    """Rank of each assignment within its expert.

    priority None: token order (earliest tokens first, the `position` drop policy).
    priority [S, k]: higher first, ties by token order (the `probs` policy, with gate probabilities).
    """
    flat = experts.reshape(-1)
    n = flat.shape[0]
    if priority is None:
        order = jnp.argsort(flat, stable=True)
    else:
        by_priority = jnp.argsort(-priority.reshape(-1), stable=True)
        order = by_priority[jnp.argsort(flat[by_priority], stable=True)]
    counts = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)
    starts = jnp.cumsum(counts) - counts
    ranks = jnp.arange(n, dtype=jnp.int32) - starts[flat[order]]
    positions = jnp.zeros((n,), jnp.int32).at[order].set(ranks)
    return Slots(positions.reshape(experts.shape), counts)


def slot_indices(experts: jax.Array, positions: jax.Array, capacity: int) -> jax.Array:
    """Flat slot e * capacity + position for kept assignments, -1 for those beyond capacity (dropped)."""
    return jnp.where(positions < capacity, experts * capacity + positions, -1)


def dispatch(x: jax.Array, slots: jax.Array, num_slots: int) -> jax.Array:
    """Gather token rows [S, d] into expert slots [num_slots, d]; empty slots are zero.

    slots [S, k] holds each assignment's flat slot, or -1 when dropped.
    """
    s, k = slots.shape
    token = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[:, None], (s, k)).reshape(-1)
    target = jnp.where(slots.reshape(-1) >= 0, slots.reshape(-1), num_slots)
    slot_token = jnp.full((num_slots + 1,), s, jnp.int32).at[target].set(token)[:num_slots]
    x_padded = jnp.concatenate([x, jnp.zeros((1, x.shape[-1]), x.dtype)], axis=0)
    return x_padded[slot_token]


def combine(y: jax.Array, slots: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted sum of each token's expert outputs: out[t] = sum_j w_tj * y[slot_tj]; dropped add nothing."""
    num_slots = y.shape[0]
    y_padded = jnp.concatenate([y, jnp.zeros((1, y.shape[-1]), y.dtype)], axis=0)
    gathered = y_padded[jnp.where(slots >= 0, slots, num_slots)]  # [S, k, d]
    return jnp.einsum("skd,sk->sd", gathered, weights.astype(y.dtype))


class SortedAssignments(NamedTuple):
    order: jax.Array  # [T*k] assignment indices sorted by expert (stable)
    inverse: jax.Array  # [T*k] position of each assignment in the sorted order
    group_sizes: jax.Array  # [E] int32


def sort_by_expert(experts: jax.Array, num_experts: int) -> SortedAssignments:
    """Dropless grouping: all assignments sorted by expert, with per-expert group sizes."""
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)
    return SortedAssignments(order, inverse, group_sizes)


def gather_sorted(x: jax.Array, sorted_: SortedAssignments, top_k: int) -> jax.Array:
    """Token rows [T, d] -> one row per assignment in expert order [T*k, d]."""
    return _gather_sorted(x, sorted_.order, sorted_.inverse, top_k)


def combine_sorted(y_sorted: jax.Array, sorted_: SortedAssignments, weights: jax.Array) -> jax.Array:
    """Expert-ordered outputs [T*k, d] -> weighted sum per token [T, d]."""
    return _combine_sorted(y_sorted, weights, sorted_.order, sorted_.inverse)


# The sorted order is a permutation of the assignments, so each gather's gradient is gathers through the inverse
# permutation, where autodiff would transpose it into a scatter-add: on the CPU (4,096 tokens, top-2, width 256)
# the combine's forward and backward took 3.6 ms with it against 2.0-2.3 with gathers, the sorted gather's 0.9
# against 0.5, each once per MoE layer.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_sorted(x: jax.Array, order: jax.Array, inverse: jax.Array, top_k: int) -> jax.Array:
    return x[order // top_k]


def _gather_sorted_fwd(x: jax.Array, order: jax.Array, inverse: jax.Array, top_k: int):
    return _gather_sorted(x, order, inverse, top_k), inverse


def _gather_sorted_bwd(top_k: int, inverse: jax.Array, d_rows: jax.Array):
    # A token's gradient: the sum of its k assignments' rows.
    return _assignment_rows(d_rows, inverse, top_k, lambda j, rows: rows), None, None


_gather_sorted.defvjp(_gather_sorted_fwd, _gather_sorted_bwd)


@jax.custom_vjp
def _combine_sorted(y_sorted: jax.Array, weights: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
    w = weights.astype(y_sorted.dtype)
    return _assignment_rows(y_sorted, inverse, weights.shape[1], lambda j, rows: rows * w[:, j, None])


def _combine_sorted_fwd(y_sorted: jax.Array, weights: jax.Array, order: jax.Array, inverse: jax.Array):
    return _combine_sorted(y_sorted, weights, order, inverse), (y_sorted, weights, order, inverse)


def _combine_sorted_bwd(saved, d_out: jax.Array):
    y_sorted, weights, order, inverse = saved
    k = weights.shape[1]
    # Sorted row i is assignment order[i]: token order[i] // k's choice order[i] % k.
    d_token = d_out[order // k].astype(y_sorted.dtype)
    d_y = d_token * weights.reshape(-1)[order][:, None].astype(y_sorted.dtype)
    d_weights = jnp.sum(d_token * y_sorted, axis=-1)[inverse].reshape(weights.shape)
    return d_y, d_weights.astype(weights.dtype), None, None


_combine_sorted.defvjp(_combine_sorted_fwd, _combine_sorted_bwd)


def _assignment_rows(rows: jax.Array, inverse: jax.Array, top_k: int, term) -> jax.Array:
    """sum over j < top_k of term(j, the rows of every token's j-th assignment [T, d]): k row gathers through the
    inverse permutation, which XLA fuses with the sum into one pass (a gather of [T, k, d] reduced after took 2-3x
    as long on the CPU)."""
    by_choice = inverse.reshape(-1, top_k)
    return sum(term(j, rows[by_choice[:, j]]) for j in range(top_k))
