"""Capacity positions by counting sort: each assignment's rank among those of its expert.

An assignment is one (token, chosen expert) pair, token-major, as in dispatch.py. Ranking in
token order is the `position` drop policy: with capacity C an assignment is kept iff its
rank is < C, so the earliest tokens of a group keep their slots.

Two kernels over blocks of assignments, both parallel over blocks:
  1. per-block expert counts (a one-hot [block, E] summed over the block);
  2. rank = the exclusive cumsum of the counts of earlier blocks (the block's offset for
     each expert) + the in-block inclusive cumsum of the one-hot, minus one.
Between them, the exclusive cumsum over blocks is an XLA op on the tiny [blocks, E] array.
No sort and no atomics, so the result is deterministic and equal to dispatch.expert_positions.
The `probs` policy orders assignments by gate probability, which needs a sort; it stays on
the XLA path (see expert_positions).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from skymoe_jax.kernels.common import compiler_params, out_struct, pow2, resolve_interpret, rows_per_tile
from skymoe_jax.model.moe import dispatch
from skymoe_jax.model.moe.dispatch import Slots


def expert_positions(
    experts: jax.Array, num_experts: int, priority: jax.Array | None = None, *, interpret: bool | None = None
) -> Slots:
    """Pallas twin of dispatch.expert_positions: experts [S, k] -> Slots(positions [S, k], counts [E]).

    priority (the `probs` drop policy) is delegated to dispatch.expert_positions: a priority
    order is a sort, which Triton cannot express, and positions are a small share of the cost.
    """
    if priority is not None:
        return dispatch.expert_positions(experts, num_experts, priority)
    interpret = resolve_interpret(interpret)
    flat = experts.reshape(-1).astype(jnp.int32)
    n = flat.shape[0]
    ep = pow2(num_experts)
    block = rows_per_tile(ep, cap=1024)
    grid = (pl.cdiv(n, block),)
    geometry = dict(n=n, block=block, ep=ep)
    block_counts = pl.pallas_call(
        functools.partial(_count_kernel, **geometry),
        out_shape=out_struct((grid[0], ep), jnp.int32, flat),
        grid=grid,
        compiler_params=compiler_params(),
        interpret=interpret,
        name="skymoe_expert_counts",
    )(flat)
    offsets = jnp.cumsum(block_counts, axis=0) - block_counts
    positions = pl.pallas_call(
        functools.partial(_rank_kernel, **geometry),
        out_shape=out_struct((n,), jnp.int32, flat, offsets),
        grid=grid,
        compiler_params=compiler_params(),
        interpret=interpret,
        name="skymoe_expert_ranks",
    )(flat, offsets)
    return Slots(positions.reshape(experts.shape), jnp.sum(block_counts[:, :num_experts], axis=0))


def _one_hot(experts_ref, *, n: int, block: int, ep: int) -> jax.Array:
    """[block, ep] int32 one-hot of this block's assignments; rows past the end are all zero."""
    start = pl.program_id(0) * block
    e = plgpu.load(experts_ref.at[pl.ds(start, block)], mask=start + jnp.arange(block) < n, other=-1)
    return (e[:, None] == jnp.arange(ep)[None, :]).astype(jnp.int32)


def _count_kernel(experts_ref, counts_ref, *, n: int, block: int, ep: int):
    counts = jnp.sum(_one_hot(experts_ref, n=n, block=block, ep=ep), axis=0)
    plgpu.store(counts_ref.at[pl.program_id(0), pl.ds(0, ep)], counts)


def _rank_kernel(experts_ref, offsets_ref, positions_ref, *, n: int, block: int, ep: int):
    b = pl.program_id(0)
    hot = _one_hot(experts_ref, n=n, block=block, ep=ep)
    offset = plgpu.load(offsets_ref.at[b, pl.ds(0, ep)])
    rank = jnp.sum(hot * (jnp.cumsum(hot, axis=0) - 1 + offset[None, :]), axis=1)
    start = b * block
    plgpu.store(positions_ref.at[pl.ds(start, block)], rank, mask=start + jnp.arange(block) < n)
