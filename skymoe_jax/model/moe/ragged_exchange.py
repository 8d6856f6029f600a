"""Dropless under an expert axis: each device sends exactly its assigned rows to the devices holding their experts.

A device's assignments, sorted by expert (dispatch.sort_by_expert), hold the rows for each destination device
contiguously, since the experts are split contiguously over the axis. From every device's per-expert counts
(all-gathered: ep x E integers) each device works out what it sends where and where it lands, as the offsets and
sizes of `jax.lax.ragged_all_to_all`; the received rows arrive packed by source device, then by expert, and are
regrouped by local expert for the grouped matmul. The combine sends the outputs back with the reverse exchange.

The receive buffer has a static size, the worst case `receive_rows`: every token of every device choosing the
experts of one device. XLA:CPU has no ragged-all-to-all (its thunk emitter rejects the opcode at run time, jax
0.10.2), so on the CPU `padded_all_to_all` moves the same rows with the same semantics inside per-destination
buffers of the worst case: the counts, offsets, regrouping and reverse are the same code on every backend.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from skymoe_jax.kernels import common

# Backends whose XLA runs ragged-all-to-all (checked by a deviceless XLA:GPU compile, tests/test_gpu_compile.py).
NATIVE_PLATFORMS = ("gpu",)


def native(platform: str) -> bool:
    """Whether the exchange on `platform` is jax.lax.ragged_all_to_all, rather than the padded fallback."""
    return platform in NATIVE_PLATFORMS


def chunk_rows(tokens: int, top_k: int, local_experts: int) -> int:
    """The most rows one device can send another: each token sends one row to each chosen expert there."""
    return tokens * min(top_k, local_experts)


def receive_rows(tokens: int, top_k: int, num_experts: int, devices: int) -> int:
    """The static size of a device's receive buffer: the rows of every source's worst case together (at most
    num_experts x tokens, one row per token and expert)."""
    return devices * chunk_rows(tokens, top_k, num_experts // devices)


class Exchange(NamedTuple):
    """One direction of the exchange, in ragged_all_to_all's terms: [ep] int32 each, indexed by peer device."""

    input_offsets: jax.Array  # where the rows for each peer start in the rows sent
    send_sizes: jax.Array
    output_offsets: jax.Array  # where the rows sent to each peer start in that peer's buffer
    recv_sizes: jax.Array


def _exclusive_cumsum(a: jax.Array, axis: int) -> jax.Array:
    return jnp.cumsum(a, axis=axis) - a


def exchanges(sizes: jax.Array, me: jax.Array) -> tuple[Exchange, Exchange]:
    """sizes [ep source, ep destination]: rows each device sends each device. -> (the dispatch, from the sorted
    assignments into receive buffers packed by source; the combine, back)."""
    starts_in = _exclusive_cumsum(sizes, 1)  # where a destination's rows start among its source's sorted rows
    starts_out = _exclusive_cumsum(sizes, 0)  # where a source's rows start in its destination's buffer
    forward = Exchange(starts_in[me], sizes[me], starts_out[me], sizes[:, me])
    return forward, Exchange(starts_out[:, me], sizes[:, me], starts_in[:, me], sizes[me])


def regroup(counts: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
    """counts [ep source, local experts]: the received rows, packed by source then expert, in a buffer of `rows`.
    -> (the position of each row when grouped by local expert (sources in order within an expert; the unused rows
    after every expert's, where they were), rows per local expert)."""
    flat = counts.reshape(-1)
    ends = jnp.cumsum(flat)
    segment = jnp.searchsorted(ends, jnp.arange(rows, dtype=flat.dtype), side="right")
    filled = segment < flat.shape[0]
    segment = jnp.minimum(segment, flat.shape[0] - 1)
    group_sizes = jnp.sum(counts, axis=0)
    # Grouped: expert e's rows start after the experts before it, and source i's after the sources before it there.
    group_starts = _exclusive_cumsum(group_sizes, 0)[None, :] + _exclusive_cumsum(counts, 0)
    within = jnp.arange(rows, dtype=flat.dtype) - (ends - flat)[segment]
    position = jnp.where(filled, group_starts.reshape(-1)[segment] + within, jnp.arange(rows, dtype=flat.dtype))
    return position, group_sizes


def padded_all_to_all(
    operand: jax.Array, output: jax.Array, exchange: Exchange, *, axis_name: str, chunk: int
) -> jax.Array:
    """jax.lax.ragged_all_to_all's result (one slice per peer) from an all-to-all of per-peer buffers of `chunk`
    rows, each peer's rows at their front: what XLA:CPU runs."""
    rows = jnp.arange(chunk, dtype=exchange.send_sizes.dtype)
    source = exchange.input_offsets[:, None] + rows
    sent = jnp.where(
        (rows < exchange.send_sizes[:, None])[..., None], operand[jnp.minimum(source, operand.shape[0] - 1)], 0
    )
    received = jax.lax.all_to_all(sent, axis_name, 0, 0, tiled=True)
    starts = jax.lax.all_to_all(exchange.output_offsets, axis_name, 0, 0, tiled=True)
    target = jnp.where(rows < exchange.recv_sizes[:, None], starts[:, None] + rows, output.shape[0])
    return output.at[target.reshape(-1)].set(received.reshape(-1, *operand.shape[1:]), mode="drop")


def transport(operand: jax.Array, rows: int, exchange: Exchange, *, axis_name: str, chunk: int) -> jax.Array:
    """operand's rows sent as `exchange` says, into a zeroed buffer of `rows` on each receiver, by the traced
    platform's transport (chunk: the most rows one peer sends another, which the fallback's buffers hold)."""
    # Typed to vary like the rows it receives: ragged_all_to_all's result takes the type of this buffer, and one
    # typed invariant would have its gradient summed over the mesh.
    output = common.vary_like(jnp.zeros((rows, *operand.shape[1:]), operand.dtype), operand)
    if native(common.platform()):
        return jax.lax.ragged_all_to_all(operand, output, *exchange, axis_name=axis_name)
    return padded_all_to_all(operand, output, exchange, axis_name=axis_name, chunk=chunk)
