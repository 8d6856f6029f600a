"""The MoE feed-forward block: float32 router, capacity or dropless dispatch,
experts, combine, and the per-layer statistics the trainer needs (aux loss,
z-loss, drop rate, router metrics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from skymoe_jax.config import capacity
from skymoe_jax.model.layers import param
from skymoe_jax.model.moe import dispatch, router
from skymoe_jax.model.moe.experts import Experts
from skymoe_jax.model.spec import ModelSpec


class MoEBlock(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        self.gate = param(rngs, (spec.d_model, spec.num_experts), ("embed", None), spec.router_init_std, jnp.float32)
        self.experts = Experts(spec, rngs)
        self.spec = spec

    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x [B, S, d] -> (y [B, S, d], stats). Stats are over all tokens of x (the global batch under jit).

        drop_rate = assignments beyond capacity / (k * tokens). In dropless mode nothing
        is dropped; drop_rate is what the configured capacity factor would have dropped,
        so the adaptive aux coefficients get the same signal either way.
        """
        spec = self.spec
        b, s, d = x.shape
        n, k = spec.num_experts, spec.top_k
        tokens = x.reshape(b * s, d)
        logits = jnp.dot(tokens.astype(jnp.float32), self.gate[...].astype(jnp.float32))
        r = router.route(logits, k, gate_norm=spec.gate_norm, lam=spec.gate_norm_lambda, ddof=spec.gate_norm_ddof,
                         eps=spec.gate_norm_eps, renormalize=spec.renormalize)

        group = spec.group_size or s
        if (b * s) % group:
            raise ValueError(f"moe.group_size={group} does not divide the {b * s} tokens of this batch")
        num_groups = b * s // group
        cap = capacity(group, n, k, spec.capacity_factor if train else spec.eval_capacity_factor)
        experts_g = r.experts.reshape(num_groups, group, k)
        weights_g = r.weights.reshape(num_groups, group, k)
        if spec.drop_policy == "probs":
            priority = jnp.take_along_axis(r.probs, r.experts, axis=-1).reshape(num_groups, group, k)
            positions = jax.vmap(lambda e, p: dispatch.expert_positions(e, n, p).positions)(experts_g, priority)
        else:
            positions = jax.vmap(lambda e: dispatch.expert_positions(e, n).positions)(experts_g)
        dropped = jnp.sum(positions >= cap)

        if not spec.dropless:
            y = self._through_slots(tokens.reshape(num_groups, group, d), experts_g, positions, weights_g, cap)
        elif spec.dropless_impl == "padded":
            # Every expert gets room for the whole group: nothing can drop, at n/k times the expert FLOPs.
            y = self._through_slots(tokens.reshape(num_groups, group, d), experts_g, positions, weights_g, group)
        else:
            order = dispatch.sort_by_expert(r.experts, n)
            rows = dispatch.gather_sorted(tokens, order, k)
            y = dispatch.combine_sorted(self.experts.ragged(rows, order.group_sizes), order, r.weights)

        aux = router.aux_loss_paper(r.probs) if spec.aux_loss == "paper" else router.aux_loss_switch(r.probs,
                                                                                                      r.experts)
        stats = router.router_stats(r.probs, r.experts)
        stats.update(aux_loss=aux, z_loss=router.z_loss(r.logits), drop_rate=dropped / (b * s * k))
        return y.reshape(b, s, d).astype(x.dtype), stats

    def _through_slots(self, x_g: jax.Array, experts_g: jax.Array, positions: jax.Array, weights_g: jax.Array,
                       cap: int) -> jax.Array:
        """Capacity path: groups [G, S_g, d] -> slot buffers [E, G*cap, d] -> experts -> combine."""
        g, _, d = x_g.shape
        n = self.spec.num_experts
        slots = dispatch.slot_indices(experts_g, positions, cap)
        buf = jax.vmap(dispatch.dispatch, in_axes=(0, 0, None))(x_g, slots, n * cap)  # [G, E*cap, d]
        buf = buf.reshape(g, n, cap, d).transpose(1, 0, 2, 3).reshape(n, g * cap, d)
        out = self.experts.batched(buf)
        out = out.reshape(n, g, cap, d).transpose(1, 0, 2, 3).reshape(g, n * cap, d)
        return jax.vmap(dispatch.combine)(out, slots, weights_g)
