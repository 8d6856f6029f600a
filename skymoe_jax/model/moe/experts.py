"""Stacked expert feed-forward weights [E, ...] and the ways to apply them: to
fixed-capacity slot buffers (batched matmul), to expert-sorted rows (grouped
matmul: jax.lax.ragged_dot, the Pallas kernel on GPUs), or to partly filled slot buffers compacted first."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from skymoe_jax.kernels import cpu_expert_ffn, cpu_ffi
from skymoe_jax.kernels.common import on_gpu, vary_like
from skymoe_jax.kernels.cpu_matmul import trans_a_matmul
from skymoe_jax.kernels.grouped_matmul import grouped_matmul
from skymoe_jax.model.layers import param, swiglu, swiglu_backward
from skymoe_jax.model.spec import ModelSpec


class ExpertWeights(NamedTuple):
    gate: jax.Array  # [E, d, f]
    up: jax.Array  # [E, d, f]
    down: jax.Array  # [E, f, d]


class Experts(nnx.Module):
    """E SwiGLU experts: down_e(silu(x W_gate_e) * (x W_up_e))."""

    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        e, d, f, std, dt = spec.num_experts, spec.d_model, spec.expert_ffn_dim, spec.init_std, spec.weight_dtype
        self.w_gate = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std, dt)
        self.w_up = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std, dt)
        self.w_down = param(rngs, (e, f, d), ("expert", "mlp", "embed"), std, dt)
        self.dtype = spec.compute_dtype

    def weights(self) -> ExpertWeights:
        """The weights in the compute dtype, as plain arrays (they cross shard_map boundaries)."""
        return ExpertWeights(*(w[...].astype(self.dtype) for w in (self.w_gate, self.w_up, self.w_down)))


def skips_empty_slots(w: ExpertWeights, x: jax.Array) -> bool:
    """Whether `batched` runs the CPU kernels for these operands, which skip the rows `used` says are empty (so a
    dispatcher need only count and send them then)."""
    return cpu_ffi.usable(x, *w)


def batched(w: ExpertWeights, x: jax.Array, used: jax.Array | None = None) -> jax.Array:
    """x [E, C, d]: row block e goes through expert e. used [E, K] (optional): each expert's C rows are K equal
    runs (routing groups) that fill from their first row, used[e, k] of them; the rows past it must be zero. The
    CPU kernels skip them; elsewhere they are computed, and give zero."""
    # Under shard_map the weights vary over fewer mesh axes than x, and the custom gradient comes back with its
    # inputs' type: cast to vary like x, they get their gradient summed over those axes, as autodiff of the
    # einsums would. Off a mesh nothing is cast and the weights stay the inputs they are (the planner counts
    # what the backward keeps beyond its inputs).
    if used is None:
        used = jnp.full((x.shape[0], 1), x.shape[1], jnp.int32)
    return _batched(ExpertWeights(*(vary_like(a, x) for a in w)), x, used.astype(jnp.int32))


@jax.custom_vjp
def _batched(w: ExpertWeights, x: jax.Array, used: jax.Array) -> jax.Array:
    return _batched_fwd(w, x, used)[0]


def _batched_fwd(w: ExpertWeights, x: jax.Array, used: jax.Array):
    # On the CPU a compiled kernel runs the three matmuls with the SwiGLU between them (kernels/cpu_expert_ffn.py).
    if skips_empty_slots(w, x):
        y, gate, up = cpu_expert_ffn.forward(*w, x, used)
        return y, (w, x, used, gate, up)
    gate, up = jnp.einsum("ecd,edf->ecf", x, w.gate), jnp.einsum("ecd,edf->ecf", x, w.up)
    return jnp.einsum("ecf,efd->ecd", jax.nn.silu(gate) * up, w.down), (w, x, used, gate, up)


def _batched_bwd(saved, dy: jax.Array):
    # Keeps x and the two projections and recomputes the SwiGLU output for the down projection's gradient
    # (autodiff keeps it too: a tensor of the widest shape per layer), behind the incoming gradient.
    # The weight gradients contract over the slot rows; trans_a_matmul runs them faster than XLA's dot on the CPU.
    w, x, used, gate, up = saved
    if skips_empty_slots(w, dy):
        dx, d_gate, d_up, h = cpu_expert_ffn.backward(*w, gate, up, dy, used)
    else:
        h, d_gate, d_up = swiglu_backward(gate, up, jnp.einsum("ecd,efd->ecf", dy, w.down))
        dx = jnp.einsum("ecf,edf->ecd", d_gate, w.gate) + jnp.einsum("ecf,edf->ecd", d_up, w.up)
    grads = (trans_a_matmul(x, d_gate, used), trans_a_matmul(x, d_up, used), trans_a_matmul(h, dy, used))
    return ExpertWeights(*grads), dx, None


_batched.defvjp(_batched_fwd, _batched_bwd)


def ragged(w: ExpertWeights, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [A, d] sorted by expert, group_sizes [E] rows per expert (rows past their sum are not computed)."""
    # XLA:GPU turns ragged_dot into a dense matmul over every expert's copy of x (E times the work and memory):
    # traced for a GPU, the grouped matmul is the Pallas kernel.
    matmul = grouped_matmul if on_gpu() else jax.lax.ragged_dot
    h = swiglu(matmul(x, w.gate, group_sizes), matmul(x, w.up, group_sizes))
    return matmul(h, w.down, group_sizes)


def compact_ragged(w: ExpertWeights, x: jax.Array, filled: jax.Array) -> jax.Array:
    """x [E, R, d] slot buffers of which `filled` [E, R] are in use: only the used rows are computed.

    Used rows are moved to the front in expert order (a stable sort), run through the grouped
    matmul, and moved back; unused rows come out zero.
    """
    e, r, d = x.shape
    expert = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32)[:, None], (e, r))
    key = jnp.where(filled, expert, e).reshape(-1)  # unused rows sort after every expert's rows
    order = jnp.argsort(key, stable=True)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    y = ragged(w, x.reshape(e * r, d)[order], jnp.sum(filled, axis=1, dtype=jnp.int32))
    return jnp.where(filled[..., None], y[inverse].reshape(e, r, d), 0)
