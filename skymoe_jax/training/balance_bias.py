"""Auxiliary-loss-free balancing (DeepSeek-V3; Wang et al., arXiv 2408.15664): a per-expert bias b added to the
routing scores for top-k selection only, moved after each step by b_j += rate * sign(mean_i c_i - c_j), c_j the
assignments expert j received over the global batch (before capacity dropping).

The sign is decided on the integer counts, never on float means: a float32 mean of counts above 2^24 (or a
bfloat16 one above 256, Megatron-LM PR 7081) rounds onto a neighbouring count and gives the wrong sign, or none.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections


def uses_bias(balance: str) -> bool:
    """moe.balance selects by biased scores (`bias`, `aux+bias`)."""
    return "bias" in balance.split("+")


def uses_aux(balance: str) -> bool:
    """moe.balance adds the auxiliary loss (`aux`, `aux+bias`)."""
    return "aux" in balance.split("+")


def initial_bias(config: ml_collections.ConfigDict, num_moe_layers: int) -> jax.Array | None:
    """[num_moe_layers, num_experts] zeros; None when moe.balance has no bias (checkpoints without one load)."""
    if not num_moe_layers or not uses_bias(config.moe.balance):
        return None
    return jnp.zeros((num_moe_layers, config.moe.num_experts), jnp.float32)


def load_error_sign(counts: jax.Array) -> jax.Array:
    """sign(mean_i c_i - c_j) over the last axis of integer counts c, exactly, as int32.

    With total = q E + r (0 <= r < E) the mean is q + r / E, so c_j is below it when c_j < q, or c_j = q and r > 0;
    above it when c_j > q; equal only when c_j = q and r = 0. Nothing larger than the total is formed (E c_j would
    overflow int32 sooner).
    """
    n = counts.shape[-1]
    total = jnp.sum(counts, axis=-1, keepdims=True)
    q, r = total // n, total % n
    below = (counts < q) | ((counts == q) & (r > 0))
    return jnp.where(below, 1, jnp.where(counts > q, -1, 0)).astype(jnp.int32)


def update_bias(bias: jax.Array, counts: jax.Array, rate: float) -> jax.Array:
    """Next step's bias [L, E] float32 from this step's integer assignment counts [L, E]."""
    return bias + jnp.float32(rate) * load_error_sign(counts).astype(jnp.float32)
