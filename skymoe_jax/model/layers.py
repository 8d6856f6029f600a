"""Building blocks of the decoder: parameters with logical axes, RMSNorm, rotary
embeddings, SwiGLU feed-forward, token embedding and output head."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from skymoe_jax.kernels.cpu_matmul import on_one_device, weight_gradient
from skymoe_jax.model.spec import ModelSpec


def param(
    rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], std: float, dtype: jnp.dtype
) -> nnx.Param:
    """A normal(std) parameter tagged with logical axis names (mapped to mesh axes in parallel/mesh.py)."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), axes=axes)


class RMSNorm(nnx.Module):
    """RMSNorm over x's last len(axes) dimensions, which have the scale's shape: the model's width by default; one
    attention head's (head_dim) or all heads' ((heads, head_dim)) for the QK-norms of Qwen3 and OLMoE."""

    def __init__(self, spec: ModelSpec, shape: tuple[int, ...] | None = None, axes: tuple[str, ...] = ("embed",)):
        shape = shape or (spec.d_model,)
        assert len(shape) == len(axes), (shape, axes)
        self.scale = nnx.Param(jnp.ones(shape, spec.weight_dtype), axes=axes)
        self.eps = spec.norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        over = tuple(range(-self.scale.ndim, 0))
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=over, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rotary(x: jax.Array, positions: jax.Array, theta: float, length: int | None = None) -> jax.Array:
    """Rotary position embedding (rotate-half form) of x [B, S, heads, head_dim] at integer positions [B, S].

    Positions lie in [0, length), by default [0, S) as packing makes them (and as the exported config's
    max_position_embeddings says); decoding with a KV cache passes the cache's length. A position outside gives
    NaN, never a silently wrong rotation."""
    length = length or x.shape[1]
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = jnp.arange(length, dtype=jnp.float32)[:, None] * freq  # [length, half]
    # Looked up from [S, half] tables rather than computed at [B, S, half]: XLA's CPU fusion recomputes a
    # cos or sin inside each of its consumers (every head, forward and backward: 24 copies a step of the
    # default model), 4 ms of each layer's 45; a gather reads its table many times, which keeps it apart.
    index = jnp.where(positions >= 0, positions, length)  # jnp.take would wrap a negative index around
    cos, sin = (
        jnp.take(f(angle), index, axis=0, mode="fill", fill_value=jnp.nan)[:, :, None] for f in (jnp.cos, jnp.sin)
    )
    # The halves as an axis of their own: XLA's CPU backend writes a stack along it with vector stores, where a
    # concatenate along the last axis went element by element (1 ms of a layer's forward and backward).
    halves = x.astype(jnp.float32).reshape(*x.shape[:-1], 2, half)
    x1, x2 = halves[..., 0, :], halves[..., 1, :]
    return jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-2).reshape(x.shape).astype(x.dtype)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, whose gradient keeps only its two inputs for the backward pass and recomputes
    the rest there; autodiff keeps the sigmoid and the derivative factor as well, two more tensors of
    the FFN's widest shape per layer."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate: jax.Array, up: jax.Array):
    return jax.nn.silu(gate) * up, (gate, up)


def swiglu_backward(gate: jax.Array, up: jax.Array, dh: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SwiGLU recomputed in a backward pass from its inputs and the gradient dh of its output:
    (silu(gate) * up, d_gate, d_up)."""
    # The recomputed sigmoid must depend on the incoming gradient: otherwise XLA schedules it in the
    # forward pass and keeps it alive until here, the memory this gradient exists to save. XLA keeps
    # `0 * dh` (it is NaN where dh is not finite), where an optimization barrier is gone before scheduling.
    sigmoid = jax.nn.sigmoid(gate + 0 * dh)
    return gate * sigmoid * up, dh * up * sigmoid * (1 + gate * (1 - sigmoid)), dh * gate * sigmoid


def _swiglu_bwd(saved, dh: jax.Array):
    return swiglu_backward(*saved, dh)[1:]


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class SwiGLU(nnx.Module):
    """Dense feed-forward: down(silu(x W_gate) * (x W_up))."""

    def __init__(self, spec: ModelSpec, width: int, rngs: nnx.Rngs):
        d, std, dt = spec.d_model, spec.init_std, spec.weight_dtype
        self.w_gate = param(rngs, (d, width), ("embed", "mlp"), std, dt)
        self.w_up = param(rngs, (d, width), ("embed", "mlp"), std, dt)
        self.w_down = param(rngs, (width, d), ("mlp", "embed"), std, dt)
        self.dtype = spec.compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        gate, up = (project("...d,df->...f", x, w[...].astype(dt)) for w in (self.w_gate, self.w_up))
        h = swiglu(gate, up)
        return project("...f,fd->...d", h, self.w_down[...].astype(dt))


class Embed(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        self.table = param(rngs, (spec.vocab_size, spec.d_model), ("vocab", "embed"), spec.init_std, spec.weight_dtype)
        self.dtype = spec.compute_dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.table[...], tokens, axis=0).astype(self.dtype)


class Head(nnx.Module):
    """Untied output projection; logits are float32 for a stable softmax cross-entropy."""

    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        self.w = param(rngs, (spec.d_model, spec.vocab_size), ("embed", "vocab"), spec.init_std, spec.weight_dtype)
        self.dtype = spec.compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return float32_logits(x, self.w[...].astype(self.dtype))


@jax.custom_vjp
def float32_logits(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w with float32 results, and a backward whose matmuls run in x's and w's own type.

    Autodiff would multiply the float32 cotangent by the narrow operands, which XLA widens: in bfloat16 the head's
    two backward matmuls ran in float32 (seen in the compiled HLO, tests/test_gpu_compile.py). The cotangent is
    rounded to the operands' type instead, as the forward's inputs are; float32 models are unchanged."""
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _float32_logits_fwd(x, w):
    return float32_logits(x, w), (x, w)


def _float32_logits_bwd(saved, g):
    x, w = saved
    g = g.astype(x.dtype)
    dx = jnp.dot(g, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = weight_gradient(x, g).astype(w.dtype)
    return dx, dw


float32_logits.defvjp(_float32_logits_fwd, _float32_logits_bwd)


def project(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """jnp.einsum(spec, x, w) for a dense projection: w's leading axes contract x's trailing ones, w's other axes
    follow x's leading ones ("bsd,dhk->bshk", "bshk,hkd->bsd"). Where the CPU kernels take the weight's gradient
    (kernels/cpu_matmul.py's weight_gradient) it is theirs; elsewhere the einsum's own."""
    if not on_one_device(x, w):
        return jnp.einsum(spec, x, w)
    x_axes = spec.split(",")[0]
    return _project(x, w, sum(a in x_axes for a in spec.split(",")[1].split("->")[0]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _project(x: jax.Array, w: jax.Array, contracted: int) -> jax.Array:
    return jnp.tensordot(x, w, contracted)


def _project_fwd(x, w, contracted):
    return _project(x, w, contracted), (x, w)


def _project_bwd(contracted, saved, g):
    x, w = saved
    outs = w.ndim - contracted
    dx = jnp.tensordot(g, w, (tuple(range(g.ndim - outs, g.ndim)), tuple(range(contracted, w.ndim))))
    rows = x.shape[: x.ndim - contracted]
    dw = weight_gradient(x.reshape(*rows, -1), g.reshape(*rows, -1))
    return dx, dw.reshape(w.shape)


_project.defvjp(_project_fwd, _project_bwd)
