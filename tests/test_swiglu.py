"""The SwiGLU activation with a hand-written gradient (model/layers.py swiglu), and the expert FFN built on its
backward (model/moe/experts.py batched): the same values and gradients as autodiff of silu(gate) * up and of
the plain expert formula, and less memory kept for the backward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skymoe_jax.kernels import cpu_ffi
from skymoe_jax.model.layers import swiglu
from skymoe_jax.model.moe import experts
from skymoe_jax.model.moe.experts import ExpertWeights


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


def _expert_inputs(dtype=jnp.float32, e=4, c=64, d=16, f=32, seed=2):
    k = jax.random.split(jax.random.key(seed), 5)
    w = ExpertWeights(
        *(0.3 * jax.random.normal(k[i], shape) for i, shape in enumerate([(e, d, f), (e, d, f), (e, f, d)]))
    )
    x = jax.random.normal(k[3], (e, c, d))
    dy = jax.random.normal(k[4], (e, c, d))
    return jax.tree.map(lambda a: a.astype(dtype), (w, x, dy))


def _expert_reference(w, x):
    h = _reference(jnp.einsum("ecd,edf->ecf", x, w.gate), jnp.einsum("ecd,edf->ecf", x, w.up))
    return jnp.einsum("ecf,efd->ecd", h, w.down)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_expert_ffn_values_and_gradients_equal_autodiff(dtype, tol):
    """experts.batched keeps the two projections and recomputes the SwiGLU output in its backward pass."""
    w, x, dy = _expert_inputs(dtype)
    out, vjp = jax.vjp(experts.batched, w, x)
    ref_out, ref_vjp = jax.vjp(_expert_reference, w, x)
    # In float32 on the CPU the forward is the C++ kernel's (kernels/cpu_expert_ffn.py), which sums in another order.
    ref_out = np.asarray(ref_out, np.float32)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=tol * np.abs(ref_out).max(), rtol=0)
    for got, want in zip(jax.tree.leaves(vjp(dy)), jax.tree.leaves(ref_vjp(dy))):
        assert got.dtype == want.dtype == dtype
        want = np.asarray(want, np.float32)
        # float32: sums of 64 products in another order; bf16 rounds the recomputed products once more.
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tol * np.abs(want).max(), rtol=0)


def test_expert_ffn_gradient_under_shard_map_sums_over_the_token_shards():
    """Replicated weights, tokens split over 8 devices: the weights' gradient is the sum over the shards, as
    autodiff of the unsharded formula gives it (the custom gradient must carry the weights' mesh type)."""
    w, x, dy = _expert_inputs(c=64)
    mesh = jax.make_mesh((8,), ("data",))
    spec = jax.sharding.PartitionSpec(None, "data")

    def loss(fn):
        return lambda w, x: jnp.sum(fn(w, x) * dy)

    sharded = jax.shard_map(
        lambda w, x, dy: jax.lax.psum(jnp.sum(experts.batched(w, x) * dy), "data"),
        mesh=mesh,
        in_specs=(jax.sharding.PartitionSpec(), spec, spec),
        out_specs=jax.sharding.PartitionSpec(),
    )
    with jax.set_mesh(mesh):
        split = jax.sharding.NamedSharding(mesh, spec)
        got = jax.jit(jax.grad(sharded, argnums=(0, 1)))(w, jax.device_put(x, split), jax.device_put(dy, split))
    want = jax.grad(loss(_expert_reference), argnums=(0, 1))(w, x)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def _expert_swiglu_autodiff(w, x):
    """The expert FFN with the hand-written swiglu and autodiff for the rest, which keeps the SwiGLU output."""
    h = swiglu(jnp.einsum("ecd,edf->ecf", x, w.gate), jnp.einsum("ecd,edf->ecf", x, w.up))
    return jnp.einsum("ecf,efd->ecd", h, w.down)


def test_expert_ffn_backward_keeps_less_than_autodiff(monkeypatch):
    """Three residual expert layers: the SwiGLU outputs ([E, C, f] each) that autodiff around the hand-written
    swiglu keeps are gone, but for about one (the backward starts at the last layer, which uses its own at
    once): 1.75 tensors less here, 2.5-2.75 with four layers, 30 MiB of the default config's step. The CPU
    kernels' path keeps one [E, C, d] tensor more (all of a kernel call's outputs are materialized)."""
    e, c, d, f, layers = 4, 512, 32, 128, 3
    k = jax.random.split(jax.random.key(3), layers + 1)
    weights = [
        _expert_inputs(e=e, c=c, d=d, f=f, seed=int(s[0]))[0] for s in jax.random.randint(k[0], (layers, 1), 0, 99)
    ]
    x = jax.random.normal(k[1], (e, c, d))

    def temp_bytes(fn):
        def loss(ws, x):
            for w in ws:
                x = x + fn(w, x)
            return jnp.sum(x**2)

        return jax.jit(jax.grad(loss)).lower(weights, x).compile().memory_analysis().temp_size_in_bytes

    autodiff = temp_bytes(_expert_swiglu_autodiff)
    kernel = temp_bytes(experts.batched) if cpu_ffi.available() else None
    monkeypatch.setattr(cpu_ffi, "available", lambda: False)
    xla = temp_bytes(lambda w, x: experts.batched(w, x))
    assert xla <= autodiff - (layers - 1.5) * e * c * f * 4
    if kernel is not None:
        # Besides: each layer's rows in use, [E, 1] int32, under XLA's buffer alignment (1 KiB is ample).
        assert kernel <= xla + e * c * d * 4 + 1024
