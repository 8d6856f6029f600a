"""Pipeline parallelism over the `pipeline` mesh axis: a GPipe schedule in SPMD form.

The layer stack is stored stage by stage ([stages x longest stage, ...], split over
`pipeline`), each stage padded to the longest one. Inside shard_map over `pipeline`
(the `data` and `expert` axes stay automatic, and the MoE layers open their own
shard_map over them) every device runs its stage for M + P - 1 ticks: stage 0 takes
embedded microbatch t, the others take what the previous stage sent (collective
permute), and the last stage applies the final norm, head and loss. A stage runs its
layers under `lax.cond` with a per-device predicate, so padded layer slots and idle
ticks (the bubble) cost no compute: fewer layers on a stage means less work for it,
which is what a non-uniform split such as (5, 5, 5, 5, 4) relies on.

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

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from skymoe_jax.model.loss import cross_entropy
from skymoe_jax.model.transformer import REMAT_POLICIES, Transformer


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Idle share of a GPipe schedule with equal stages: (P - 1) / (M + P - 1)."""
    return (stages - 1) / (microbatches + stages - 1)


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


def forward(
    model: Transformer, batch: dict[str, jax.Array], *, train: bool, microbatches: int, stage_remat: Sequence[str]
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(sum of token cross-entropies, counted tokens, per-layer MoE means in layer order)."""
    split = model.mesh_layout
    stages, longest = len(split.stage_layers), max(split.stage_layers)
    sizes = jnp.asarray(split.stage_layers, jnp.int32)
    policies = sorted(set(stage_remat))
    policy_of_stage = jnp.asarray([policies.index(r) for r in stage_remat], jnp.int32)
    blocks_def, blocks = nnx.split(model.stacks[0].blocks)
    norm_def, norm = nnx.split(model.final_norm)
    head_def, head = nnx.split(model.head)
    mbs = {k: _microbatches(v, microbatches) for k, v in batch.items()}
    embedded = model.embed(mbs.pop("inputs"))

    def run_block(block_state, x, positions, segment_ids):
        return nnx.merge(blocks_def, block_state)(x, positions, segment_ids, train=train)

    variants = [run_block if r == "none" else jax.checkpoint(run_block, policy=REMAT_POLICIES[r]) for r in policies]

    replicated = (norm, head, embedded)
    dtypes = jax.tree.map(lambda a: a.dtype, replicated)

    def stage_fn(blocks, replicated, mbs):
        norm, head, embedded = jax.tree.map(lambda a, d: a.astype(d), replicated, dtypes)
        stage = jax.lax.axis_index("pipeline")
        n_layers, policy = sizes[stage], policy_of_stage[stage]

        def layers(x, positions, segment_ids):
            def body(x, inputs):
                block_state, j = inputs
                run = lambda x: jax.lax.switch(policy, variants, block_state, x, positions, segment_ids)
                skip = lambda x: (x, zero_stats)
                return jax.lax.cond(j < n_layers, run, skip, x)

            return jax.lax.scan(body, x, (blocks, jnp.arange(longest)))

        mb0 = {k: v[0] for k, v in mbs.items()}
        x0 = jax.ShapeDtypeStruct(embedded.shape[1:], embedded.dtype)
        block0 = jax.tree.map(lambda a: a[0], blocks)
        _, stats_shape = jax.eval_shape(lambda x: run_block(block0, x, mb0["positions"], mb0["segment_ids"]), x0)
        zero_stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats_shape)

        def tick(carry, t):
            received, ce_sum, count, acc = carry
            m = t - stage  # the microbatch this stage works on now
            active = (m >= 0) & (m < microbatches)
            i = jnp.clip(m, 0, microbatches - 1)
            mb = {k: v[i] for k, v in mbs.items()}
            x = jnp.where(stage == 0, embedded[i], received)
            x, stats = jax.lax.cond(
                active,
                lambda x: layers(x, mb["positions"], mb["segment_ids"]),
                lambda x: (x, jax.tree.map(lambda z: jnp.zeros((longest, *z.shape), z.dtype), zero_stats)),
                x,
            )

            # Recomputed in the backward pass: a cond keeps the residuals of either branch on every tick of
            # every stage, so a saved loss would hold a microbatch's float32 logits per tick everywhere.
            @jax.checkpoint
            def loss(x, mb):
                return cross_entropy(nnx.merge(head_def, head)(nnx.merge(norm_def, norm)(x)), mb)

            ce, n = jax.lax.cond(
                active & (stage == stages - 1), loss, lambda x, mb: (jnp.float32(0), jnp.float32(0)), x, mb
            )
            sent = jax.lax.ppermute(x, "pipeline", [(i, i + 1) for i in range(stages - 1)])
            acc = jax.tree.map(jnp.add, acc, stats)
            return (sent, ce_sum + ce, count + n, acc), None

        acc0 = jax.tree.map(lambda z: jnp.zeros((longest, *z.shape), z.dtype), zero_stats)
        init = (jnp.zeros(x0.shape, x0.dtype), jnp.float32(0), jnp.float32(0), acc0)
        (_, ce_sum, count, acc), _ = jax.lax.scan(tick, init, jnp.arange(microbatches + stages - 1))
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
    # acc: [stored slots, MoE layers per block (1), ...] sums over microbatches -> per-layer means in order.
    slots = split.layer_slots(model.spec.num_layers)
    moe = jax.tree.map(lambda a: a[slots].reshape(-1, *a.shape[2:]) / microbatches, acc) if acc else {}
    return ce_sum, count, moe
