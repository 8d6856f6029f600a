"""The MoE feed-forward layer, as named phases (the way Megatron-Core's MoELayer and token dispatchers read):

    route     float32 logits, gate normalization, softmax or sigmoid,     router.py, kernels/route.py
              (group-limited) top-k
    place     each assignment's position in its expert within its routing  dispatch.py, kernels/positions.py
              group; the capacity; which assignments drop
    dispatch  tokens into the experts' inputs      }
    experts   the expert FFNs                      }  one Dispatcher per path, below
    combine   the weighted sum back to the tokens  }
    stats     the router's batch means (for the aux loss), z-loss, drop rate, router metrics, and per-sequence
              means (load imbalance, the sequence-wise aux loss)

Each stage has one name across the XLA functions and their Pallas twins (kernels/ops.py). The dispatchers:
- SlotDispatcher: capacity-bounded slot buffers [E, G*cap, d] on this device, the experts as a batched
  matmul (dropless `padded`: room for the whole group in every expert).
- ExpertParallelDispatcher: the same slots sent by all-to-all over the expert axis to the devices holding
  their experts, and back.
- RaggedDispatcher: dropless on one device: every assignment sorted by expert, through a grouped matmul
  (the CPU kernels, the Pallas kernel on GPUs, or jax.lax.ragged_dot).
- RaggedExchangeDispatcher: dropless under an expert axis: exactly the assigned rows sent to the devices holding
  their experts and back (ragged_exchange.py), the grouped matmul on the rows each device receives.

`moe_tokens` is the whole layer on one shard of tokens. Without a device mesh it sees every token; under a
mesh, model/moe/expert_parallel.py runs it inside shard_map and `Comm` tells it how to reach the other
shards (all-to-all over the expert axis, means over the token axes).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from skymoe_jax.config import capacity
from skymoe_jax.kernels.ops import RoutingOps, interpreted, routing_ops
from skymoe_jax.model.layers import SwiGLU, param
from skymoe_jax.model.moe import dispatch, expert_parallel, experts, ragged_exchange, router
from skymoe_jax.model.moe.expert_parallel import Comm
from skymoe_jax.model.moe.experts import Experts, ExpertWeights
from skymoe_jax.model.spec import ModelSpec


class MoEBlock(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs, layout: str):
        """layout: parallel.layout, how the layer is laid over the expert axis (model/moe/expert_parallel.py)."""
        self.gate = param(rngs, (spec.d_model, spec.num_experts), ("embed", None), spec.router_init_std, jnp.float32)
        self.experts = Experts(spec, rngs)
        if spec.shared_width:
            # Every token's, so split like a dense FFN (over `mlp`), not over the expert axis.
            self.shared = SwiGLU(spec, spec.shared_width, rngs)
            if spec.shared_expert_gate == "sigmoid":
                # Never split (d_model numbers): as an `embed` weight, ZeRO-1 and FSDP split it over data, and XLA
                # moved its [d, 1] gradient to that split with a collective-permute inside the pipeline's cond of
                # a layer, which the stages that skip the layer never join: the step hung.
                self.shared_gate = param(rngs, (spec.d_model, 1), (None, None), spec.init_std, spec.weight_dtype)
        self.spec = spec
        self.layout = layout

    def __call__(
        self, x: jax.Array, *, train: bool, bias: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x [B, S, d] -> (y [B, S, d], stats over every token of the global batch); bias [E]: the selection bias
        of loss-free balancing (training/balance_bias.py), or None."""
        spec = self.spec
        group = spec.group_size or x.shape[1]

        def layer(tokens: jax.Array, gate: jax.Array, weights: ExpertWeights, bias: jax.Array | None, comm: Comm):
            return moe_tokens(
                tokens, gate, weights, spec, train=train, group=group, seq_len=x.shape[1], comm=comm, bias=bias
            )

        # The Pallas interpreter mixes mesh-varying operands with its own unvarying loop indices, which
        # shard_map's varying-axes type check rejects (JAX 0.10-0.11); the program itself is sound.
        y, stats = expert_parallel.apply(
            layer,
            x,
            self.gate[...],
            self.experts.weights(),
            self.layout,
            bias=bias,
            check_vma=not interpreted(spec.routing_impl),
        )
        y = y.astype(x.dtype)
        if spec.shared_width:
            shared = self.shared(x)
            if spec.shared_expert_gate == "sigmoid":
                shared = shared * jax.nn.sigmoid(x @ self.shared_gate[...].astype(x.dtype))
            y = y + shared
        return y, stats


class Placement(NamedTuple):
    """Where each assignment goes, per routing group [G, S_g, k]."""

    experts: jax.Array  # int32 chosen experts
    weights: jax.Array  # combine weights
    positions: jax.Array  # int32 rank among its expert's assignments in the group
    capacity: int  # slots per expert and group
    dropped: jax.Array  # [T] float32 assignments of each token beyond capacity
    counts: jax.Array  # [G, E] int32 assignments per expert and group (before dropping)


def moe_tokens(
    tokens: jax.Array,
    gate: jax.Array,
    weights: ExpertWeights,
    spec: ModelSpec,
    *,
    train: bool,
    group: int,
    seq_len: int,
    comm: Comm = Comm(),
    bias: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The MoE layer on tokens [T, d] (rows of seq_len tokens) -> (y [T, d], stats).

    drop_rate = assignments beyond capacity / (k * tokens). In dropless mode nothing
    is dropped; drop_rate is what the configured capacity factor would have dropped,
    so the adaptive aux coefficients get the same signal either way. With a selection bias the stats also hold
    expert_counts: int32 assignments per expert over the global batch before dropping, which move the bias.
    """
    t, d = tokens.shape
    ops = routing_ops(spec.routing_impl)
    routing = route(tokens, gate, spec, ops, bias)
    placement = place(routing, spec, group, train, ops)
    y = dispatcher(spec, comm, ops, group, placement.capacity)(tokens, routing, placement, weights)
    stats = statistics(routing, placement, spec, comm, seq_len)
    if bias is not None:
        stats["expert_counts"] = comm.total(jnp.sum(placement.counts, axis=0))
    return y.reshape(t, d), stats


def route(
    tokens: jax.Array, gate: jax.Array, spec: ModelSpec, ops: RoutingOps, bias: jax.Array | None = None
) -> router.Routing:
    logits = jnp.dot(tokens.astype(jnp.float32), gate.astype(jnp.float32))
    # Only the XLA route takes a bias (config.py refuses moe.routing_impl=pallas with one).
    selection = {} if bias is None else {"bias": bias}
    routing = ops.route(
        logits,
        spec.top_k,
        gate_norm=spec.gate_norm,
        lam=spec.gate_norm_lambda,
        ddof=spec.gate_norm_ddof,
        eps=spec.gate_norm_eps,
        renormalize=spec.renormalize,
        score=spec.score,
        num_groups=spec.num_groups,
        top_groups=spec.top_groups,
        **selection,
    )
    if spec.routed_scale != 1.0:
        routing = routing._replace(weights=routing.weights * spec.routed_scale)
    return routing


def place(routing: router.Routing, spec: ModelSpec, group: int, train: bool, ops: RoutingOps) -> Placement:
    """Positions within routing groups of `group` tokens, by token order or (drop_policy=probs) by gate
    probability; the capacity of the configured factor (the eval factor when not training)."""
    t, k = routing.experts.shape
    n = spec.num_experts
    if t % group:
        raise ValueError(f"moe.group_size={group} does not divide the {t} tokens of this shard")
    num_groups = t // group
    cap = capacity(group, n, k, spec.capacity_factor if train else spec.eval_capacity_factor)
    experts_g = routing.experts.reshape(num_groups, group, k)
    if spec.drop_policy == "probs":
        priority = jnp.take_along_axis(routing.probs, routing.experts, axis=-1).reshape(num_groups, group, k)
        slots = jax.vmap(lambda e, p: ops.expert_positions(e, n, p))(experts_g, priority)
    else:
        slots = jax.vmap(lambda e: ops.expert_positions(e, n))(experts_g)
    dropped = jnp.sum(slots.positions >= cap, axis=-1).reshape(t).astype(jnp.float32)
    weights = routing.weights.reshape(num_groups, group, k)
    return Placement(experts_g, weights, slots.positions, cap, dropped, slots.counts)


def statistics(
    routing: router.Routing, placement: Placement, spec: ModelSpec, comm: Comm, seq_len: int
) -> dict[str, jax.Array]:
    """Token means over the global batch, and per-sequence ones (a sequence: one row of seq_len tokens) averaged
    over its rows: the load imbalance, and with moe.aux_scope=sequence the aux loss. seq_max_vio_shuffled is the
    per-sequence imbalance of rows mixed from different sequences (router.interleaved_rows), where a shard holds
    two whole rows or more: what remains of seq_max_vio without the sequences' own content."""
    mean = comm.mean
    stats = router.router_stats(routing.probs, routing.experts, mean)
    stats.update(z_loss=router.z_loss(routing.logits, mean), drop_rate=mean(placement.dropped) / spec.top_k)
    assigned = router.assignments(routing.experts, spec.num_experts)
    row_load = comm.sequence_means(assigned, seq_len) / spec.top_k
    stats["seq_max_vio"] = comm.row_mean(router.max_violation(row_load))
    # Rows mixed from this shard's own sequences; a shard of fewer than two whole rows has none to mix.
    if assigned.shape[0] % seq_len == 0 and assigned.shape[0] >= 2 * seq_len:
        mixed_load = comm.sequence_means(router.interleaved_rows(assigned, seq_len), seq_len) / spec.top_k
        stats["seq_max_vio_shuffled"] = comm.row_mean(router.max_violation(mixed_load))
    if spec.aux_scope == "sequence":
        row_probs = comm.sequence_means(routing.probs, seq_len)
        stats["seq_aux_loss"] = comm.row_mean(router.aux_loss_from_means(row_probs, row_load, spec.aux_loss))
    return stats


def dispatcher(spec: ModelSpec, comm: Comm, ops: RoutingOps, group: int, cap: int):
    """The dispatch path of this layer on this mesh."""
    n = spec.num_experts
    if spec.dropless and comm.expert_axis:
        return RaggedExchangeDispatcher(n, comm.expert_axis)
    if spec.dropless and experts.dropless_impl(spec.dropless_impl, spec.compute_dtype) == "ragged":
        return RaggedDispatcher(n)
    slots = group if spec.dropless else cap  # dropless `padded`: room for the whole group in every expert
    if comm.expert_axis:
        return ExpertParallelDispatcher(n, slots, ops, comm.expert_axis)
    return SlotDispatcher(n, slots, ops)


def expert_rows(spec: ModelSpec, tokens: int, group: int, devices: int) -> int:
    """Rows the experts' FFN runs on in one device whose shard routes `tokens` tokens under an expert axis of
    `devices`, as `dispatcher` picks the path: dropless across devices the receive buffer, on one device the
    assignments (`ragged`) or every expert sized for the group (`padded`), else the capacity's slots."""
    if spec.dropless and devices > 1:
        return ragged_exchange.receive_rows(tokens, spec.top_k, spec.num_experts, devices)
    if spec.dropless and experts.dropless_impl(spec.dropless_impl, spec.compute_dtype) == "ragged":
        return tokens * spec.top_k
    per_group = group if spec.dropless else capacity(group, spec.num_experts, spec.top_k, spec.capacity_factor)
    return spec.num_experts * per_group * (tokens // group)


class SlotDispatcher:
    """Groups [G, S_g, d] -> slot buffers [E, G*cap, d] -> experts -> combine, on this device."""

    def __init__(self, num_experts: int, capacity: int, ops: RoutingOps):
        self.num_experts, self.capacity, self.ops = num_experts, capacity, ops

    def __call__(self, tokens: jax.Array, routing: router.Routing, placement: Placement, weights: ExpertWeights):
        n, cap = self.num_experts, self.capacity
        g = placement.experts.shape[0]
        tokens_g = tokens.reshape(g, -1, tokens.shape[-1])
        slots = dispatch.slot_indices(placement.experts, placement.positions, cap)
        buf = _expert_major(jax.vmap(self.ops.dispatch, in_axes=(0, 0, None))(tokens_g, slots, n * cap), n)
        if experts.skips_empty_slots(weights, buf):
            # An expert's slots in a group fill from the first: the rows each group uses, [E, G], let the CPU
            # kernels skip the empty ones. Elsewhere they are neither counted nor sent.
            buf, used = self.send(buf, jnp.minimum(placement.counts, cap).T)
            out = experts.batched(weights, buf, used)
        else:
            (buf,) = self.send(buf)
            out = experts.batched(weights, buf)
        return jax.vmap(self.ops.combine)(_group_major(self.receive(out), g), slots, placement.weights)

    def send(self, *arrays: jax.Array) -> tuple[jax.Array, ...]:
        """The slot buffer [E, R, d], and the rows each group uses ([E, G]) where counted, to the devices holding
        the experts."""
        return arrays

    def receive(self, out: jax.Array) -> jax.Array:
        return out


class ExpertParallelDispatcher(SlotDispatcher):
    """The slot path with the experts on other devices: an all-to-all sends each expert's slots to the
    device holding it ([E, R, d] -> [E/ep, ep*R, d]) and a second one brings the outputs back."""

    def __init__(self, num_experts: int, capacity: int, ops: RoutingOps, axis: str):
        super().__init__(num_experts, capacity, ops)
        self.axis = axis

    def send(self, *arrays: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(jax.lax.all_to_all(a, self.axis, 0, 1, tiled=True) for a in arrays)

    def receive(self, out: jax.Array) -> jax.Array:
        return jax.lax.all_to_all(out, self.axis, 1, 0, tiled=True)


class RaggedDispatcher:
    """Dropless on one device: assignments sorted by expert [T*k, d], a grouped matmul, and back."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def __call__(self, tokens: jax.Array, routing: router.Routing, placement: Placement, weights: ExpertWeights):
        order = dispatch.sort_by_expert(routing.experts, self.num_experts)
        rows = dispatch.gather_sorted(tokens, order, routing.experts.shape[-1])
        return dispatch.combine_sorted(experts.ragged(weights, rows, order.group_sizes), order, routing.weights)


class RaggedExchangeDispatcher:
    """Dropless with the experts split over `axis`: each device's assignments sorted by expert, exactly the rows
    for each device's experts sent there, regrouped by local expert for the grouped matmul, and back."""

    def __init__(self, num_experts: int, axis: str):
        self.num_experts, self.axis = num_experts, axis

    def __call__(self, tokens: jax.Array, routing: router.Routing, placement: Placement, weights: ExpertWeights):
        t, k = routing.experts.shape
        devices = jax.lax.axis_size(self.axis)
        order, counts, (forward, backward) = self.exchange(routing.experts)
        size = ragged_exchange.receive_rows(t, k, self.num_experts, devices)
        chunk = ragged_exchange.chunk_rows(t, k, self.num_experts // devices)
        rows = dispatch.gather_sorted(tokens, order, k)
        received = ragged_exchange.transport(rows, size, forward, axis_name=self.axis, chunk=chunk)
        position, group_sizes = ragged_exchange.regroup(counts[:, jax.lax.axis_index(self.axis)], size)
        grouped = received[jnp.zeros_like(position).at[position].set(jnp.arange(size, dtype=position.dtype))]
        out = experts.ragged(weights, grouped, group_sizes)[position]
        back = ragged_exchange.transport(out, t * k, backward, axis_name=self.axis, chunk=chunk)
        return dispatch.combine_sorted(back, order, routing.weights)

    def exchange(
        self, chosen: jax.Array
    ) -> tuple[dispatch.SortedAssignments, jax.Array, tuple[ragged_exchange.Exchange, ragged_exchange.Exchange]]:
        """chosen [T, k] experts -> (this device's assignments sorted by expert; counts [ep, ep, local experts]: the
        rows device i sends to local expert e of device j; the dispatch's and the combine's exchanges)."""
        devices = jax.lax.axis_size(self.axis)
        order = dispatch.sort_by_expert(chosen, self.num_experts)
        counts = jax.lax.all_gather(order.group_sizes, self.axis).reshape(devices, devices, -1)
        return order, counts, ragged_exchange.exchanges(jnp.sum(counts, axis=-1), jax.lax.axis_index(self.axis))


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
