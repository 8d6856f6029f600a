"""Pipeline parallelism over the `pipeline` mesh axis: GPipe and circular schedules in SPMD form.

The layer stack is stored device by device ([devices x chunks x longest chunk, ...], split over `pipeline`),
every chunk padded to the longest (model/mesh_layout.py). Inside shard_map over `pipeline` (the `data` and
`expert` axes stay automatic, and the MoE layers open their own shard_map over them) every device runs M R + P - 1
ticks. At tick t device s works on item k = t - s, which is microbatch k mod M in its chunk (repeat) k div M:
virtual stage 0 takes embedded microbatch m, every other takes what the previous device sent (collective
permute, round the ring when R > 1: the last device's output comes back to device 0, which keeps it until the
microbatch's next repeat; M >= P makes that wait non-negative), and the last virtual stage applies the final norm,
head and loss. Layers run under `lax.cond` with a per-device predicate, so padded layer slots, the other chunks'
layers and idle ticks (the bubble) cost no compute: fewer layers on a stage means less work for it, which is
what a non-uniform split such as (5, 5, 5, 5, 4) relies on.

Memory does not grow with the ticks. Autodiff of a `cond` keeps its branches' residuals as its outputs, and a
checkpointed layer's residuals are its inputs, weights included, so a checkpointed layer under a cond under the
tick loop once stacked a float32 copy of the stage's weights per tick (264 GiB a device on the paper's layout).
Here:
- each tick is rematerialized keeping only its input activation (named TICK_INPUT);
- a layer's cond sits inside the checkpoint of what it gates (a layer under full remat: inside a custom VJP that
  recomputes it within its own cond, `_recomputed_layer`), so what reaches the loops are the checkpoints' inputs,
  activations, and the weights, which the loops forward instead of stacking;
- the weights' gradients build up in one accumulator carried through the ticks and layers (`_sink`).
The backward recomputes one tick at a time and one layer at a time. The price is compute: a tick's forward runs
again in the backward, and under full remat each layer's once more (parallel/plan.py's forward_passes).

The embedding runs before this region, on all microbatches at once, for two reasons
that show once data and expert are both above 1. XLA's SPMD partitioner aborts on a
gather along a dimension split over an automatic axis inside a shard_map manual over
another (the EDP layout splits the vocabulary over `expert`; the loss avoids the same
gather, model/loss.py). And a collective permute under a stage-dependent `lax.cond`
hangs: XLA emits it for every device, but the other stages never reach it; resharding
the embedding's gradient for ZeRO-1 / FSDP produced one. The price: every stage holds
the embedded batch (one activation of it per device), and its gradient is summed over
`pipeline`.

Microbatch m is rows m, m + M, ... of the batch, so every data-parallel device holds an
equal part of each microbatch. Statistics are accumulated over microbatches as token
means (equal sizes), and the aux loss is taken once from the accumulated means, so a
pipelined step computes the same loss as the whole batch at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from skymoe_jax.model.loss import cross_entropy
from skymoe_jax.model.transformer import REMAT_POLICIES, Transformer

TICK_INPUT = "pipeline_tick_input"
# What a stage's layers keep for their backward inside a (recomputed) tick, by parallel.stage_remat.
LAYER_POLICIES = {"none": jax.checkpoint_policies.everything_saveable, **REMAT_POLICIES}


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """Idle share of a schedule with equal stages: (P - 1) / (M R + P - 1); R = 1 is GPipe."""
    return (stages - 1) / (microbatches * repeats + stages - 1)


def _microbatches(a: jax.Array, m: int) -> jax.Array:
    """[B, ...] -> [M, B / M, ...], microbatch i = rows i, i + M, i + 2M, ..."""
    return a.reshape(a.shape[0] // m, m, *a.shape[1:]).swapaxes(0, 1)


def _as_float32(tree):
    """Narrow float leaves widened to float32 (others as they are).

    XLA's SPMD partitioner aborts ("Invalid binary instruction opcode copy") on the gradient of a replicated
    bfloat16 input to a shard_map manual over `pipeline` only; float32 at that boundary avoids it, and the
    stages cast back to the model's dtypes inside, so the numbers are those of the narrow type."""
    wide = lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize < 4 else a
    return jax.tree.map(wide, tree)


def _gated(fn: Callable, otherwise: Callable, policy) -> Callable:
    """pred, *args -> fn(*args) if pred else otherwise(*args), checkpointed around the cond: the checkpoint's
    residuals are its inputs, which the enclosing loops forward, where the cond's own would be copies."""
    return jax.checkpoint(lambda pred, *args: jax.lax.cond(pred, fn, otherwise, *args), policy=policy)


@jax.custom_vjp
def _sink(weights, sink, slot):
    """(weights, sink) as they are; backward, the weights' cotangent is added into the sink's at `slot`.

    The stage's weight gradients then build up in one buffer: the sink starts as `w - stop_gradient(w)` (zeros
    whose cotangent is w's), is carried through every tick and layer, and each layer adds its gradient in place.
    Left to autodiff, each tick's transposed layer loop would stack a fresh gradient of the stage and add it to the
    tick loop's accumulator: two buffers of the stage's size."""
    return weights, sink


def _sink_fwd(weights, sink, slot):
    return (weights, sink), slot


def _sink_bwd(slot, cotangents):
    d_weights, d_sink = cotangents
    return (
        None,
        jax.tree.map(lambda s, d: s.at[slot].add(d), d_sink, d_weights),
        None,
    )


_sink.defvjp(_sink_fwd, _sink_bwd)


def _recomputed_layer(run_block: Callable, skip: Callable) -> Callable:
    """A stage's layer under full rematerialization: pred, frozen, sink, slot, x, positions, segment_ids ->
    (x, stats, sink), running layer `slot` of the frozen weights where pred holds (the identity elsewhere), with a
    backward that recomputes it inside its own cond and adds its weights' gradient into the sink at `slot`.

    Autodiff of a cond saves the branch's residuals as the cond's outputs, the layer's weights among them (the
    other branch does not forward them), so the recomputed layer copied its weights out of the cond next to its
    gradient; here the forward and backward of the layer meet inside one branch, and only the input is saved."""

    def apply(pred, frozen, slot, x, positions, segment_ids):
        block_state = jax.tree.map(lambda a: a[slot], frozen)
        return jax.lax.cond(pred, run_block, skip, block_state, x, positions, segment_ids)

    @jax.custom_vjp
    def layer(pred, frozen, sink, slot, x, positions, segment_ids):
        return *apply(pred, frozen, slot, x, positions, segment_ids), sink

    def layer_fwd(pred, frozen, sink, slot, x, positions, segment_ids):
        out = layer(pred, frozen, sink, slot, x, positions, segment_ids)
        return out, (pred, frozen, slot, x, positions, segment_ids)

    def layer_bwd(saved, cotangents):
        pred, frozen, slot, x, positions, segment_ids = saved
        d_out, d_stats, d_sink = cotangents

        def back(block_state, x):
            _, vjp = jax.vjp(lambda w, x: run_block(w, x, positions, segment_ids), block_state, x)
            return vjp((d_out, d_stats))

        def through(block_state, x):
            return jax.tree.map(jnp.zeros_like, block_state), d_out

        d_weights, d_x = jax.lax.cond(pred, back, through, jax.tree.map(lambda a: a[slot], frozen), x)
        d_sink = jax.tree.map(lambda s, d: s.at[slot].add(d), d_sink, d_weights)
        return None, None, d_sink, None, d_x, None, None

    layer.defvjp(layer_fwd, layer_bwd)
    return layer


def forward(
    model: Transformer,
    batch: dict[str, jax.Array],
    *,
    train: bool,
    microbatches: int,
    stage_remat: Sequence[str],
    bias: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(sum of token cross-entropies, counted tokens, per-layer MoE means in layer order; integer stats summed).

    bias [MoE layers, E] in layer order (loss-free balancing) or None; it travels with the layers' weights,
    stored like them, so each layer slot finds its own."""
    split = model.mesh_layout
    devices, repeats, longest = split.devices, split.repeats, max(split.stage_layers)
    chunk_layers = jnp.asarray(split.chunk_layers(), jnp.int32)  # [devices, repeats]
    policies = sorted(set(stage_remat))
    policy_of_stage = jnp.asarray([policies.index(r) for r in stage_remat], jnp.int32)
    blocks_def, params = nnx.split(model.stacks[0].blocks)
    slots = split.layer_slots(model.spec.num_layers)
    stored_bias = None
    if bias is not None:  # stored like the weights: [stored slots, MoE layers per block (1), E], 0 in the padding
        stored = jnp.zeros((split.stored_layers(model.spec.num_layers), 1, bias.shape[-1]), bias.dtype)
        stored_bias = stored.at[slots, 0].set(bias)
    blocks = (params, stored_bias)
    norm_def, norm = nnx.split(model.final_norm)
    head_def, head = nnx.split(model.head)
    mbs = {k: _microbatches(v, microbatches) for k, v in batch.items()}
    embedded = model.embed(mbs.pop("inputs"))
    items = microbatches * repeats  # what each device runs: every microbatch through each of its chunks

    def run_block(block_state, x, positions, segment_ids):
        layer_params, layer_bias = block_state
        return nnx.merge(blocks_def, layer_params)(x, positions, segment_ids, train=train, bias=layer_bias)

    replicated = (norm, head, embedded)
    dtypes = jax.tree.map(lambda a: a.dtype, replicated)

    def stage_fn(blocks, replicated, mbs):
        norm, head, embedded = jax.tree.map(lambda a, d: a.astype(d), replicated, dtypes)
        # The weights reach the layers without a gradient; theirs flows into the sink (see _sink).
        frozen = jax.lax.stop_gradient(blocks)
        sink0 = jax.tree.map(lambda w: w - jax.lax.stop_gradient(w), blocks)
        stage = jax.lax.axis_index("pipeline")
        n_layers, policy = chunk_layers[stage], policy_of_stage[stage]

        mb0 = {k: v[0] for k, v in mbs.items()}
        x0 = jax.ShapeDtypeStruct(embedded.shape[1:], embedded.dtype)
        block0 = jax.tree.map(lambda a: a[0], blocks)
        _, stats_shape = jax.eval_shape(lambda x: run_block(block0, x, mb0["positions"], mb0["segment_ids"]), x0)

        def skip(block_state, x, positions, segment_ids):
            # Zeros made here, not closed over: _recomputed_layer's custom VJP takes no traced closures.
            return x, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats_shape)

        def layer(pred, frozen, sink, slot, x, positions, segment_ids):
            block_state, sink = _sink(jax.tree.map(lambda a: a[slot], frozen), sink, slot)
            x, stats = jax.lax.cond(pred, run_block, skip, block_state, x, positions, segment_ids)
            return x, stats, sink

        layer_variants = [
            _recomputed_layer(run_block, skip)
            if r == "full"
            else jax.checkpoint(layer, policy=LAYER_POLICIES[r], prevent_cse=False)
            for r in policies
        ]

        def layers(x, sink, positions, segment_ids, active, repeat):
            """This stage's chunk `repeat`: its stored slots in order, the padding skipped."""

            def body(carry, j):
                x, sink = carry
                run = active & (j < n_layers[repeat])
                x, stats, sink = jax.lax.switch(
                    policy, layer_variants, run, frozen, sink, repeat * longest + j, x, positions, segment_ids
                )
                return (x, sink), stats

            (x, sink), stats = jax.lax.scan(body, (x, sink), jnp.arange(longest))
            return x, sink, stats

        def loss(x, mb):
            return cross_entropy(nnx.merge(head_def, head)(nnx.merge(norm_def, norm)(x)), mb)

        gated_loss = _gated(loss, lambda x, mb: (jnp.float32(0), jnp.float32(0)), REMAT_POLICIES["full"])
        ring = repeats > 1
        pairs = [(i, (i + 1) % devices) for i in range(devices if ring else devices - 1)]

        def tick(carry, t):
            received, held, sink, ce_sum, count, acc = carry
            k = t - stage  # the item this stage works on now
            active = (k >= 0) & (k < items)
            k = jnp.clip(k, 0, items - 1)
            repeat, m = k // microbatches, k % microbatches
            mb = {key: v[m] for key, v in mbs.items()}
            if ring:
                # Device 0 keeps what the last device finished (item t - P, sent last tick) for its next repeat;
                # `held` starts as the embedded microbatches, which the first repeat reads.
                back = t - devices
                keep = (stage == 0) & (back >= 0) & (back < items - microbatches)
                slot = jnp.clip(back, 0, items - 1) % microbatches
                held = jax.lax.dynamic_update_index_in_dim(held, jnp.where(keep, received, held[slot]), slot, axis=0)
            first = held[m] if ring else embedded[m]
            x = checkpoint_name(jnp.where(stage == 0, first, received), TICK_INPUT)
            x, sink, stats = layers(x, sink, mb["positions"], mb["segment_ids"], active, repeat)
            last = active & (stage == devices - 1) & (repeat == repeats - 1)
            ce, n = gated_loss(last, x, mb)
            sent = jax.lax.ppermute(x, "pipeline", pairs)
            acc = jax.tree.map(
                lambda a, s: jax.lax.dynamic_update_slice_in_dim(
                    a, jax.lax.dynamic_slice_in_dim(a, repeat * longest, longest) + s, repeat * longest, 0
                ),
                acc,
                stats,
            )
            return (sent, held, sink, ce_sum + ce, count + n, acc), None

        # Only the tick's input is kept for the backward; everything else in it is recomputed from it.
        tick = jax.checkpoint(tick, policy=jax.checkpoint_policies.save_only_these_names(TICK_INPUT), prevent_cse=False)
        acc0 = jax.tree.map(lambda s: jnp.zeros((repeats * longest, *s.shape), s.dtype), stats_shape)
        held0 = embedded if ring else jnp.zeros((0,), embedded.dtype)
        init = (jnp.zeros(x0.shape, x0.dtype), held0, sink0, jnp.float32(0), jnp.float32(0), acc0)
        (*_, ce_sum, count, acc), _ = jax.lax.scan(tick, init, jnp.arange(items + devices - 1))
        return jax.lax.psum(ce_sum, "pipeline"), jax.lax.psum(count, "pipeline"), acc

    stacked = P("pipeline")
    ce_sum, count, acc = jax.shard_map(
        stage_fn,
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=(stacked, P(), P()),
        out_specs=(P(), P(), stacked),
        axis_names={"pipeline"},
        check_vma=False,
    )(blocks, _as_float32(replicated), mbs)
    # acc: [stored slots, MoE layers per block (1), ...] sums over microbatches -> per-layer means in order; integer
    # counts stay sums, exact.
    in_order = {key: a[slots].reshape(-1, *a.shape[2:]) for key, a in acc.items()}
    moe = {key: a if jnp.issubdtype(a.dtype, jnp.integer) else a / microbatches for key, a in in_order.items()}
    return ce_sum, count, moe
