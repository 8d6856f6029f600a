"""Stacked expert feed-forward weights [E, ...] and the ways to apply them: to fixed-capacity slot buffers (batched
matmul) or to expert-sorted rows (grouped matmul). One custom gradient serves both layouts: the CPU kernels take
either (kernels/cpu_expert_ffn.py), XLA's batched or ragged dot elsewhere; on GPUs the sorted rows go through the
Pallas grouped matmul (kernels/grouped_matmul.py)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from skymoe_jax.kernels import cpu_expert_ffn, cpu_ffi
from skymoe_jax.kernels.common import on_gpu, platform, vary_like
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


def dropless_impl(impl: str, dtype: jnp.dtype) -> str:
    """moe.dropless_impl for the platform being traced, `auto` resolved from measurements (docs/BENCHMARKS.md):
    the grouped matmul on the sorted rows (`ragged`) wherever it runs as one, which on the CPU means the kernels
    (float32, built: 3.9x faster than the padded matmul forward, and the step 0.37x its temporaries), and
    on GPUs, whose padded matmul does E / k times the rows; `padded` on a CPU without them, where XLA's ragged_dot
    ran 2.5-8x slower than the padded matmul."""
    if impl != "auto":
        return impl
    grouped = platform() != "cpu" or (jnp.dtype(dtype) == jnp.float32 and cpu_ffi.available())
    return "ragged" if grouped else "padded"


def skips_empty_slots(w: ExpertWeights, x: jax.Array) -> bool:
    """Whether `batched` runs the CPU kernels for these operands, which skip the rows `used` says are empty (so a
    dispatcher need only count and send them then)."""
    return cpu_ffi.usable(x, *w)


def batched(w: ExpertWeights, x: jax.Array, used: jax.Array | None = None) -> jax.Array:
    """x [E, C, d]: row block e goes through expert e. used [E, K] (optional): each expert's C rows are K equal
    runs (routing groups) that fill from their first row, used[e, k] of them; the rows past it must be zero. The
    CPU kernels skip them; elsewhere they are computed, and give zero."""
    if used is None:
        used = jnp.full((x.shape[0], 1), x.shape[1], jnp.int32)
    return _apply(w, x, used)


def ragged(w: ExpertWeights, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [A, d] sorted by expert, group_sizes [E] rows per expert (rows past their sum are not computed, and come
    out zero): a grouped matmul, nothing padded. On the CPU the kernels take the group offsets; on GPUs the Pallas
    grouped matmul; elsewhere jax.lax.ragged_dot."""
    if on_gpu():
        # XLA:GPU turns ragged_dot into a dense matmul over every expert's copy of x (E times the work and memory):
        # traced for a GPU, each grouped matmul is the Pallas kernel, with its own dx and dW kernels.
        h = swiglu(grouped_matmul(x, w.gate, group_sizes), grouped_matmul(x, w.up, group_sizes))
        return grouped_matmul(h, w.down, group_sizes)
    return _apply(w, x, group_sizes)


def _apply(w: ExpertWeights, x: jax.Array, counts: jax.Array) -> jax.Array:
    # Under shard_map the weights vary over fewer mesh axes than x, and the custom gradient comes back with its
    # inputs' type: cast to vary like x, they get their gradient summed over those axes, as autodiff of the
    # einsums would. Off a mesh nothing is cast and the weights stay the inputs they are (the planner counts
    # what the backward keeps beyond its inputs).
    return _experts(ExpertWeights(*(vary_like(a, x) for a in w)), x, counts.astype(jnp.int32))


def _matmul(x: jax.Array, w: jax.Array, counts: jax.Array) -> jax.Array:
    """Each expert's rows through its matrix w [E, in, out], in XLA's ops: slot buffers [E, C, in] as a batched
    matmul, rows sorted by expert [A, in] with group sizes as a grouped one."""
    if x.ndim == 2:
        return jax.lax.ragged_dot(x, w, counts)
    return jnp.einsum("eci,eio->eco", x, w)


def _transposed(w: jax.Array) -> jax.Array:
    return jnp.swapaxes(w, 1, 2)


@jax.custom_vjp
def _experts(w: ExpertWeights, x: jax.Array, counts: jax.Array) -> jax.Array:
    return _experts_fwd(w, x, counts)[0]


def _experts_fwd(w: ExpertWeights, x: jax.Array, counts: jax.Array):
    # On the CPU a compiled kernel runs the three matmuls with the SwiGLU between them (kernels/cpu_expert_ffn.py).
    if cpu_ffi.usable(x, *w):
        y, gate, up = cpu_expert_ffn.forward(*w, x, counts)
        return y, (w, x, counts, gate, up)
    gate, up = _matmul(x, w.gate, counts), _matmul(x, w.up, counts)
    return _matmul(jax.nn.silu(gate) * up, w.down, counts), (w, x, counts, gate, up)


def _experts_bwd(saved, dy: jax.Array):
    # Keeps x and the two projections and recomputes the SwiGLU output for the down projection's gradient
    # (autodiff keeps it too: a tensor of the widest shape per layer), behind the incoming gradient. On the CPU
    # the kernel adds each block's weight gradients while the block is in cache; elsewhere they contract over
    # each expert's rows in XLA's ops.
    w, x, counts, gate, up = saved
    if cpu_ffi.usable(dy, *w):
        dx, *grads = cpu_expert_ffn.backward(*w, x, gate, up, dy, counts)
        return ExpertWeights(*grads), dx, None
    h, d_gate, d_up = swiglu_backward(gate, up, _matmul(dy, _transposed(w.down), counts))
    dx = _matmul(d_gate, _transposed(w.gate), counts) + _matmul(d_up, _transposed(w.up), counts)
    grads = (trans_a_matmul(x, d_gate, counts), trans_a_matmul(x, d_up, counts), trans_a_matmul(h, dy, counts))
    return ExpertWeights(*grads), dx, None


_experts.defvjp(_experts_fwd, _experts_bwd)
