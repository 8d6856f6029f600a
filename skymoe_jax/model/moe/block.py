"""The MoE feed-forward block: float32 router, capacity or dropless dispatch,
experts, combine, and the per-layer statistics the trainer needs (aux loss,
z-loss, drop rate, router metrics).

`moe_tokens` is the whole layer on one shard of tokens. Without a device mesh it
sees every token; under a mesh, model/moe/expert_parallel.py runs it inside
shard_map and `Comm` tells it how to reach the other shards (all-to-all of slot
buffers over the expert axis, means over the token axes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from skymoe_jax.config import capacity
from skymoe_jax.kernels.ops import RoutingOps, interpreted, routing_ops
from skymoe_jax.model.layers import param
from skymoe_jax.model.moe import dispatch, expert_parallel, experts, router
from skymoe_jax.model.moe.expert_parallel import Comm
from skymoe_jax.model.moe.experts import Experts, ExpertWeights
from skymoe_jax.model.spec import ModelSpec


class MoEBlock(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        self.gate = param(rngs, (spec.d_model, spec.num_experts), ("embed", None), spec.router_init_std, jnp.float32)
        self.experts = Experts(spec, rngs)
        self.spec = spec

    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x [B, S, d] -> (y [B, S, d], stats over every token of the global batch)."""
        spec = self.spec
        group = spec.group_size or x.shape[1]

        def layer(tokens: jax.Array, gate: jax.Array, weights: ExpertWeights, comm: Comm):
            return moe_tokens(tokens, gate, weights, spec, train=train, group=group, comm=comm)

        # The Pallas interpreter mixes mesh-varying operands with its own unvarying loop indices, which
        # shard_map's varying-axes type check rejects (JAX 0.10-0.11); the program itself is sound.
        y, stats = expert_parallel.apply(
            layer, x, self.gate[...], self.experts.weights(), spec.layout, check_vma=not interpreted(spec.routing_impl)
        )
        return y.astype(x.dtype), stats


def moe_tokens(
    tokens: jax.Array,
    gate: jax.Array,
    weights: ExpertWeights,
    spec: ModelSpec,
    *,
    train: bool,
    group: int,
    comm: Comm = Comm(),
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The MoE layer on tokens [T, d] -> (y [T, d], stats).

    drop_rate = assignments beyond capacity / (k * tokens). In dropless mode nothing
    is dropped; drop_rate is what the configured capacity factor would have dropped,
    so the adaptive aux coefficients get the same signal either way.
    """
    t, d = tokens.shape
    n, k = spec.num_experts, spec.top_k
    logits = jnp.dot(tokens.astype(jnp.float32), gate.astype(jnp.float32))
    ops = routing_ops(spec.routing_impl)
    r = ops.route(
        logits,
        k,
        gate_norm=spec.gate_norm,
        lam=spec.gate_norm_lambda,
        ddof=spec.gate_norm_ddof,
        eps=spec.gate_norm_eps,
        renormalize=spec.renormalize,
    )

    if t % group:
        raise ValueError(f"moe.group_size={group} does not divide the {t} tokens of this shard")
    num_groups = t // group
    cap = capacity(group, n, k, spec.capacity_factor if train else spec.eval_capacity_factor)
    experts_g = r.experts.reshape(num_groups, group, k)
    weights_g = r.weights.reshape(num_groups, group, k)
    if spec.drop_policy == "probs":
        priority = jnp.take_along_axis(r.probs, r.experts, axis=-1).reshape(num_groups, group, k)
        positions = jax.vmap(lambda e, p: ops.expert_positions(e, n, p).positions)(experts_g, priority)
    else:
        positions = jax.vmap(lambda e: ops.expert_positions(e, n).positions)(experts_g)
    dropped = jnp.sum(positions >= cap, axis=-1).reshape(t).astype(jnp.float32)

    tokens_g = tokens.reshape(num_groups, group, d)
    if not spec.dropless:
        y = _through_slots(tokens_g, experts_g, positions, weights_g, cap, n, weights, comm, compact=False, ops=ops)
    elif spec.dropless_impl == "padded" or comm.expert_axis:
        # Room for the whole group in every expert: nothing can drop. Across devices this is the
        # capacity-bounded exchange (worst-case slots); `ragged` then computes only the used ones.
        y = _through_slots(
            tokens_g,
            experts_g,
            positions,
            weights_g,
            group,
            n,
            weights,
            comm,
            compact=spec.dropless_impl == "ragged",
            ops=ops,
        )
    else:
        order = dispatch.sort_by_expert(r.experts, n)
        rows = dispatch.gather_sorted(tokens, order, k)
        y = dispatch.combine_sorted(experts.ragged(weights, rows, order.group_sizes), order, r.weights)

    mean = comm.mean
    stats = router.router_stats(r.probs, r.experts, mean)
    stats.update(
        z_loss=router.z_loss(r.logits, mean),
        drop_rate=mean(dropped) / k,
    )
    return y.reshape(t, d), stats


def _expert_major(a: jax.Array, num_experts: int) -> jax.Array:
    """[G, E*cap, ...] -> [E, G*cap, ...]: each expert's slots from every group, contiguous."""
    g, slots = a.shape[:2]
    cap = slots // num_experts
    a = a.reshape(g, num_experts, cap, *a.shape[2:])
    return jnp.moveaxis(a, 1, 0).reshape(num_experts, g * cap, *a.shape[3:])


def _group_major(a: jax.Array, groups: int) -> jax.Array:
    """Inverse of _expert_major."""
    e, rows = a.shape[:2]
    cap = rows // groups
    a = a.reshape(e, groups, cap, *a.shape[2:])
    return jnp.moveaxis(a, 0, 1).reshape(groups, e * cap, *a.shape[3:])


def _through_slots(
    tokens_g: jax.Array,
    experts_g: jax.Array,
    positions: jax.Array,
    weights_g: jax.Array,
    cap: int,
    num_experts: int,
    weights: ExpertWeights,
    comm: Comm,
    *,
    compact: bool,
    ops: RoutingOps,
) -> jax.Array:
    """Capacity path: groups [G, S_g, d] -> slot buffers [E, G*cap, d] -> experts -> combine.

    With an expert axis, an all-to-all sends each expert's slots to the device holding
    it ([E, R, d] -> [E/ep, ep*R, d]) and a second one brings the outputs back.
    """
    g = tokens_g.shape[0]
    slots = dispatch.slot_indices(experts_g, positions, cap)
    buf = _expert_major(jax.vmap(ops.dispatch, in_axes=(0, 0, None))(tokens_g, slots, num_experts * cap), num_experts)
    filled = (
        _expert_major(jax.vmap(dispatch.filled_slots, in_axes=(0, None))(slots, num_experts * cap), num_experts)
        if compact
        else None
    )
    if comm.expert_axis:
        buf = jax.lax.all_to_all(buf, comm.expert_axis, 0, 1, tiled=True)
        if compact:
            filled = jax.lax.all_to_all(filled, comm.expert_axis, 0, 1, tiled=True)
    out = experts.compact_ragged(weights, buf, filled) if compact else experts.batched(weights, buf)
    if comm.expert_axis:
        out = jax.lax.all_to_all(out, comm.expert_axis, 1, 0, tiled=True)
    return jax.vmap(ops.combine)(_group_major(out, g), slots, weights_g)
