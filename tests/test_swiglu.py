"""The SwiGLU activation with a hand-written gradient (model/layers.py swiglu): the same values and
gradients as autodiff of silu(gate) * up, and less memory kept for the backward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skymoe_jax.model.layers import swiglu


def _reference(gate, up):
    return jax.nn.silu(gate) * up


def _inputs(dtype, shape=(64, 96)):
    k = jax.random.split(jax.random.key(0), 3)
    # Gate values out to +-12 reach both saturated ends of the sigmoid.
    gate = (4 * jax.random.normal(k[0], shape)).astype(dtype)
    up = jax.random.normal(k[1], shape).astype(dtype)
    dh = jax.random.normal(k[2], shape).astype(dtype)
    return gate, up, dh


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_values_and_gradients_equal_autodiff(dtype, tol):
    gate, up, dh = _inputs(dtype)
    out, vjp = jax.vjp(swiglu, gate, up)
    ref_out, ref_vjp = jax.vjp(_reference, gate, up)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref_out, np.float32))
    for got, want in zip(vjp(dh), ref_vjp(dh)):
        assert got.dtype == want.dtype == dtype
        want = np.asarray(want, np.float32)
        # Relative to the largest gradient: bf16 rounds each of the formula's few products once more.
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tol * np.abs(want).max(), rtol=0)


def test_gradient_under_jit_vmap_and_second_use():
    gate, up, dh = _inputs(jnp.float32, (3, 16, 8))

    def loss(fn):
        return lambda g, u: jnp.sum(jax.vmap(fn)(g, u) * dh) + jnp.sum(fn(g, g) ** 2)

    got = jax.jit(jax.grad(loss(swiglu), argnums=(0, 1)))(gate, up)
    want = jax.grad(loss(_reference), argnums=(0, 1))(gate, up)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_backward_keeps_less_than_autodiff():
    """Three residual FFN layers: the compiled gradient's temporaries shrink by at least one [T, f] tensor per
    layer (the sigmoid or the derivative factor autodiff keeps; XLA would keep them too if the recomputation
    were free to move into the forward pass)."""
    t, d, f, layers = 2048, 64, 256, 3
    k = jax.random.split(jax.random.key(1), 4)
    weights = [
        (
            0.1 * jax.random.normal(k[0], (d, f)),
            0.1 * jax.random.normal(k[1], (d, f)),
            0.1 * jax.random.normal(k[2], (f, d)),
        )
        for _ in range(layers)
    ]
    x = jax.random.normal(k[3], (t, d))

    def temp_bytes(fn):
        def loss(ws, x):
            for wg, wu, wd in ws:
                x = x + fn(x @ wg, x @ wu) @ wd
            return jnp.sum(x**2)

        return jax.jit(jax.grad(loss)).lower(weights, x).compile().memory_analysis().temp_size_in_bytes

    buffer = t * f * 4
    assert temp_bytes(swiglu) <= temp_bytes(_reference) - layers * buffer
