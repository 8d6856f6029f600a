"""Per-layer adaptive auxiliary-loss coefficients (Skywork-MoE, section 3.2).

alpha_hat = min(xi * d, alpha_max);  alpha_{i+1} = beta * alpha_i + (1 - beta) * alpha_hat,
with d the layer's token drop rate at step i (a fraction in [0, 1]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections


def initial_alpha(config: ml_collections.ConfigDict, num_moe_layers: int) -> jax.Array | None:
    """[num_moe_layers] initial coefficients; None for a dense model (checkpoints cannot hold empty arrays)."""
    if not num_moe_layers:
        return None
    return jnp.full((num_moe_layers,), config.aux_coef.initial_alpha, jnp.float32)


def update_alpha(
    alpha: jax.Array, drop_rate: jax.Array, *, mode: str, xi: float, beta: float, alpha_max: float
) -> jax.Array:
    """Next step's coefficients from this step's per-layer drop rates; `fixed` keeps them."""
    if mode == "fixed":
        return alpha
    target = jnp.minimum(xi * drop_rate.astype(jnp.float32), alpha_max)
    return beta * alpha + (1.0 - beta) * target
