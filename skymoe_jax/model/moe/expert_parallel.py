"""Running the MoE layer over a device mesh with shard_map.

Each device routes its own shard of tokens; slot buffers (dropless: exactly the
assigned rows, ragged_exchange.py) travel to the devices holding their experts by
all-to-all over the `expert` axis and come back the same way (block.py). Under the
Skywork EDP layout the tokens arrive replicated over the expert axis (attention
there is tensor-parallel); each expert-axis device then takes a 1/ep share of them,
as sequence parallelism does, runs the same all-to-all path, and the outputs are
all-gathered back. Statistics are averaged over every token axis, so losses, drop
rates and metrics do not depend on the mesh.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from skymoe_jax.model.axes import batch_axes


class Comm(NamedTuple):
    """How one shard of tokens reaches the rest: axes its tokens are split over, and the expert axis."""

    token_axes: tuple[str, ...] = ()
    expert_axis: str | None = None
    split_axis: str | None = None  # EDP: the axis whose devices each take a share of this shard's tokens

    def mean(self, a: jax.Array) -> jax.Array:
        """Mean over all tokens of the global batch (shards hold equal token counts)."""
        m = jnp.mean(a, axis=0)
        return jax.lax.pmean(m, self.token_axes) if self.token_axes else m

    def sequence_means(self, a: jax.Array, seq_len: int) -> jax.Array:
        """Per-token values a [T, ...] -> their mean over each row of seq_len tokens, [rows of this shard, ...].

        Under EDP a device's share of the tokens may cut rows, so the devices of the split axis add up their
        partial row sums."""
        if not self.split_axis:
            return jnp.mean(a.reshape(-1, seq_len, *a.shape[1:]), axis=1)
        share = a.shape[0]
        rows = share * jax.lax.axis_size(self.split_axis) // seq_len
        row = (jax.lax.axis_index(self.split_axis) * share + jnp.arange(share)) // seq_len
        return jax.lax.psum(jax.ops.segment_sum(a, row, num_segments=rows), self.split_axis) / seq_len

    def row_mean(self, a: jax.Array) -> jax.Array:
        """Mean over all rows of the global batch of per-row values a [rows, ...] (from sequence_means: the same
        on every device of the split axis, so averaged over the other token axes only)."""
        m = jnp.mean(a, axis=0)
        axes = tuple(axis for axis in self.token_axes if axis != self.split_axis)
        return jax.lax.pmean(m, axes) if axes else m

    def total(self, a: jax.Array) -> jax.Array:
        """Sum over the shards of the global batch (exact for integers)."""
        return jax.lax.psum(a, self.token_axes) if self.token_axes else a


Layer = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def apply(
    layer: Layer,
    x: jax.Array,
    gate: jax.Array,
    weights,
    layout: str,
    *,
    bias: jax.Array | None = None,
    check_vma: bool = True,
):
    """layer(tokens [T, d], gate, weights, bias, comm) on x [B, S, d], sharded when a mesh is set (jax.set_mesh).

    bias: the layer's selection bias [E] or None, replicated like the gate. check_vma=False skips shard_map's
    varying-axes type check (for interpreted Pallas kernels)."""
    b, s, d = x.shape
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        y, stats = layer(x.reshape(b * s, d), gate, weights, bias, Comm())
        return y.reshape(b, s, d), stats
    ep = mesh.shape["expert"]
    split_tokens = layout == "edp" and ep > 1
    token_axes = batch_axes(layout) + (("expert",) if split_tokens else ())
    comm = Comm(token_axes, "expert" if ep > 1 else None, "expert" if split_tokens else None)

    def local(x, gate, weights, bias):
        lb = x.shape[0]
        tokens = x.reshape(lb * s, d)
        if split_tokens:
            share = lb * s // ep
            start = jax.lax.axis_index("expert") * share
            y, stats = layer(jax.lax.dynamic_slice_in_dim(tokens, start, share), gate, weights, bias, comm)
            # Back to replicated over the expert axis. A psum of the zero-padded shares (rather than
            # an all-gather) keeps the result typed as invariant, as the out_specs say it is.
            y = jax.lax.psum(
                jax.lax.dynamic_update_slice_in_dim(jnp.zeros_like(tokens, y.dtype), y, start, 0), "expert"
            )
        else:
            y, stats = layer(tokens, gate, weights, bias, comm)
        return y.reshape(lb, s, d), stats

    batch = P(batch_axes(layout))
    experts = type(weights)(*(P("expert" if ep > 1 else None) for _ in weights))
    return jax.shard_map(
        local, mesh=mesh, in_specs=(batch, P(), experts, P()), out_specs=(batch, P()), check_vma=check_vma
    )(x, gate, weights, bias)
