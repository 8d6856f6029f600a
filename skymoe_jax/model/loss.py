"""The language-modelling loss, shared by the plain and the pipelined forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, number of counted tokens) over batch['loss_mask']."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"]
    return jnp.sum(losses * mask), jnp.sum(mask)
