"""The language-modelling loss, shared by the plain and the pipelined forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, number of counted tokens) over batch['loss_mask']."""
    # The target logit by a one-hot contraction, not a gather (as optax does): XLA's SPMD partitioner aborts on a
    # gather along a sharded vocab inside the pipeline's shard_map. The sum has one non-zero term, so it is exact.
    target = jnp.sum(logits * jax.nn.one_hot(batch["targets"], logits.shape[-1], dtype=logits.dtype), axis=-1)
    losses = jax.nn.logsumexp(logits, axis=-1) - target
    mask = batch["loss_mask"]
    return jnp.sum(losses * mask), jnp.sum(mask)
