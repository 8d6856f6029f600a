"""Chunked attention against the dense reference on packed batches (values and gradients, grouped queries,
several key blocks), and its compiled memory: linear in the sequence where the dense path is quadratic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skymoe_jax.kernels import cpu_ffi
from skymoe_jax.model.attention import attention_mask, resolve_attention_impl
from skymoe_jax.model.chunked_attention import block_size, chunked_attention, preferred_block


def _inputs(b=2, s=48, h=4, kv=2, d=8, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(b, s, n, d)), dtype) for n in (h, kv, kv))
    # Packed rows: documents of random lengths (sorted ids), one row a single document.
    segments = np.sort(rng.integers(0, 5, (b, s)), axis=1)
    segments[-1] = 0
    return q, k, v, jnp.asarray(segments, jnp.int32)


def _dense(q, k, v, segments):
    return jax.nn.dot_product_attention(q, k, v, mask=attention_mask(segments))


def _grads(attend, weights):
    """Jitted gradients of sum(attend(q, k, v) * weights) in q, k and v (op by op, the blocked and interpreted
    kernels' many small ops took seconds a case)."""
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * weights), argnums=(0, 1, 2)))


# Three blocks (the long profile's: the non-divisor case has six); one; a non-divisor (6 blocks of 8 are used).
@pytest.mark.parametrize("block", [pytest.param(16, marks=pytest.mark.long), 48, 7])
def test_values_and_gradients_equal_the_dense_reference(block):
    q, k, v, segments = _inputs()
    weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    np.testing.assert_allclose(
        chunked_attention(q, k, v, segments, block), _dense(q, k, v, segments), rtol=1e-5, atol=1e-5
    )
    want = _grads(lambda q, k, v: _dense(q, k, v, segments), weights)(q, k, v)
    got = _grads(lambda q, k, v: chunked_attention(q, k, v, segments, block), weights)(q, k, v)
    # float32 sums in another order (online softmax, per-block rescaling): ~1e-6 on O(1) values.
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_the_default_blocks_at_1024_tokens_equal_the_dense_reference():
    """What `auto` runs on the CPU from 512 tokens: the default block rule (four query blocks of 256 here)."""
    q, k, v, segments = _inputs(b=1, s=1024)
    assert preferred_block(1024) == 256
    weights = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)
    np.testing.assert_allclose(chunked_attention(q, k, v, segments), _dense(q, k, v, segments), rtol=1e-5, atol=1e-5)
    want = _grads(lambda q, k, v: _dense(q, k, v, segments), weights)(q, k, v)
    got = _grads(lambda q, k, v: chunked_attention(q, k, v, segments), weights)(q, k, v)
    for g, w in zip(got, want):  # as above: float32 sums in another order
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_query_blocks_never_read_the_key_blocks_above_the_diagonal():
    """NaN in the last key block: a path that computes it for earlier queries (even masked, 0 * NaN) spreads
    NaN there; skipping it leaves every earlier query block equal to the dense attention of the prefix."""
    q, k, v, segments = _inputs(s=64)
    poisoned = [a.at[:, 48:].set(jnp.nan) for a in (k, v)]
    got = chunked_attention(q, *poisoned, segments, 16)
    np.testing.assert_allclose(
        got[:, :48], _dense(q[:, :48], k[:, :48], v[:, :48], segments[:, :48]), rtol=1e-5, atol=1e-5
    )
    assert np.isnan(np.asarray(got[:, 48:])).all()


def test_bfloat16_inputs_stay_close_to_the_float32_reference():
    q, k, v, segments = _inputs(dtype=jnp.bfloat16)
    wide = [a.astype(jnp.float32) for a in (q, k, v)]
    got = chunked_attention(q, k, v, segments, 16)
    assert got.dtype == jnp.bfloat16
    # Scores and sums are float32 inside; the output is rounded once to bfloat16 (relative 2^-8).
    np.testing.assert_allclose(np.asarray(got, np.float32), _dense(*wide, segments), rtol=2e-2, atol=2e-2)


def test_block_size_tiles_the_sequence(monkeypatch):
    assert [block_size(s) for s in (48, 512, 1000, 4096, 8192)] == [48, 512, 500, 512, 512]
    monkeypatch.setattr(cpu_ffi, "available", lambda: False)  # auto's choice without the CPU kernels
    assert resolve_attention_impl("auto", 512, "gpu") == "xla" and resolve_attention_impl("auto", 1024) == "chunked"
    assert resolve_attention_impl("xla", 8192) == "xla"
    # The CPU keeps at least four query blocks, up to 256; elsewhere 512.
    assert [preferred_block(s, "cpu") for s in (256, 512, 1024, 8192)] == [64, 128, 256, 256]
    assert preferred_block(1024, "gpu") == 512


def _temp_bytes(attend, s, h=4, kv=2, d=32):
    q, k, v = (jax.ShapeDtypeStruct((1, s, n, d), jnp.float32) for n in (h, kv, kv))
    segments = jax.ShapeDtypeStruct((1, s), jnp.int32)
    step = jax.jit(jax.grad(lambda q, k, v, seg: jnp.sum(attend(q, k, v, seg)), argnums=(0, 1, 2)))
    return step.lower(q, k, v, segments).compile().memory_analysis().temp_size_in_bytes


def test_compiled_memory_is_linear_for_chunked_and_quadratic_for_dense():
    lengths = (1024, 2048, 4096)
    chunked = [_temp_bytes(lambda *a: chunked_attention(*a, 512), s) for s in lengths]
    dense = [_temp_bytes(_dense, s) for s in lengths]
    # Doubling S: at most ~2x (plus a constant) for chunked; ~4x for the [S, S] scores of the dense path.
    for small, large in zip(chunked, chunked[1:]):
        assert large <= 2.2 * small
    for small, large in zip(dense, dense[1:]):
        assert large >= 3.5 * small
    assert chunked[-1] * 8 < dense[-1]


def sharded_step(impl: str, layout: str = "edp"):
    """(grads, new state, metrics) of a train step on the (1, 4, 2) mesh with this attention."""
    from test_parallel import _config, _step

    c = _config((1, 4, 2), layout)
    c.model.attention_impl = impl
    return _step(c, jax.devices())


def test_sharded_train_step_with_chunked_attention_equals_xla():
    """EDP splits the heads over `expert` and the batch over `data`: the custom gradient must shard like the rest."""
    (g_xla, _, m_xla), (g_chunked, _, m_chunked) = sharded_step("xla"), sharded_step("chunked")
    np.testing.assert_allclose(m_chunked["loss"], m_xla["loss"], rtol=1e-6)
    # As in test_parallel: float32 gradients in another summation order.
    for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_xla)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
