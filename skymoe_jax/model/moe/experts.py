"""Stacked expert feed-forward weights [E, ...] and the two ways to apply them:
to fixed-capacity slot buffers (batched matmul) or to expert-sorted rows
(grouped matmul with jax.lax.ragged_dot)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from skymoe_jax.model.layers import param
from skymoe_jax.model.spec import ModelSpec


class Experts(nnx.Module):
    """E SwiGLU experts: down_e(silu(x W_gate_e) * (x W_up_e))."""

    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        e, d, f, std, dt = spec.num_experts, spec.d_model, spec.expert_ffn_dim, spec.init_std, spec.weight_dtype
        self.w_gate = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std, dt)
        self.w_up = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std, dt)
        self.w_down = param(rngs, (e, f, d), ("expert", "mlp", "embed"), std, dt)
        self.dtype = spec.compute_dtype

    def batched(self, x: jax.Array) -> jax.Array:
        """x [E, C, d]: row block e goes through expert e."""
        dt = self.dtype
        h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", x, self.w_gate[...].astype(dt)))
        h = h * jnp.einsum("ecd,edf->ecf", x, self.w_up[...].astype(dt))
        return jnp.einsum("ecf,efd->ecd", h, self.w_down[...].astype(dt))

    def ragged(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """x [A, d] sorted by expert, group_sizes [E] rows per expert."""
        dt = self.dtype
        h = jax.nn.silu(jax.lax.ragged_dot(x, self.w_gate[...].astype(dt), group_sizes))
        h = h * jax.lax.ragged_dot(x, self.w_up[...].astype(dt), group_sizes)
        return jax.lax.ragged_dot(h, self.w_down[...].astype(dt), group_sizes)
