"""model.attention_impl=pallas (jax's Triton flash attention, kernels/attention.py): interpreted here, it equals the
dense reference on packed batches (values and gradients, grouped queries), in a sharded train step too; lowered for
CUDA it is Triton kernels, forward and backward; shapes Triton cannot tile are refused by the config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_chunked_attention import _dense, _grads

from skymoe_jax.bench.kernel_checks import triton_calls
from skymoe_jax.config import base_config, validate
from skymoe_jax.errors import ConfigError
from skymoe_jax.kernels.attention import pallas_attention, tile


def _inputs(b=2, s=64, h=4, kv=2, d=16, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(b, s, n, d)), jnp.float32) for n in (h, kv, kv))
    segments = np.sort(rng.integers(0, 5, (b, s)), axis=1)  # packed rows: documents of random lengths
    segments[-1] = 0  # and a row that is one document
    return q, k, v, jnp.asarray(segments, jnp.int32)


@pytest.mark.parametrize("s", [64, 48])  # one forward tile of 64 (backward tiles of 32); three tiles of 16
def test_values_and_gradients_equal_the_dense_reference(s):
    q, k, v, segments = _inputs(s=s)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    flash = lambda q, k, v: pallas_attention(q, k, v, segments, "gshard", interpret=True)  # noqa: E731
    np.testing.assert_allclose(jax.jit(flash)(q, k, v), _dense(q, k, v, segments), rtol=1e-5, atol=1e-5)
    want, got = _grads(lambda q, k, v: _dense(q, k, v, segments), weights)(q, k, v), _grads(flash, weights)(q, k, v)
    # float32 sums in another order (online softmax per tile): ~1e-6 on O(1) values.
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_tiles_divide_the_sequence():
    assert [tile(s) for s in (16, 48, 256, 8192)] == [16, 16, 128, 128]
    assert [tile(s, cap=32) for s in (48, 8192)] == [16, 32]


def test_lowers_for_cuda_to_triton_kernels_forward_and_backward():
    """The paper's shape (8,192 tokens, 128-wide heads, grouped queries), bfloat16; lowering runs nothing."""
    q = jax.ShapeDtypeStruct((1, 8192, 16, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 8192, 4, 128), jnp.bfloat16)
    segments = jax.ShapeDtypeStruct((1, 8192), jnp.int32)

    def loss(q, k, v, seg):
        return jnp.sum(pallas_attention(q, k, v, seg, "gshard", interpret=False).astype(jnp.float32))

    text = (
        jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        .trace(q, kv, kv, segments)
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    assert "mosaic" not in text.lower()  # Triton, as jax's kernel asks through its compiler params
    assert triton_calls(text) == ["mha_backward", "mha_forward", "mha_preprocess_backward"]


def _config(impl):
    from test_parallel import _config as small

    c = small((1, 4, 2), "edp")
    c.model.update(d_model=64, attention_impl=impl)  # head_dim 16, the smallest Triton tile
    return c


def test_sharded_train_step_with_pallas_attention_equals_xla():
    """EDP splits the heads over `expert` and the batch over `data`: the kernel runs per device under shard_map."""
    from test_parallel import _step

    (g_xla, _, m_xla), (g_flash, _, m_flash) = (
        _step(_config("xla"), jax.devices()),
        _step(_config("pallas"), jax.devices()),
    )
    np.testing.assert_allclose(m_flash["loss"], m_xla["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_flash), jax.tree.leaves(g_xla)):  # float32 sums in another order
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_shapes_triton_cannot_tile_are_refused():
    c = base_config()
    c.model.update(attention_impl="pallas", d_model=96, num_heads=4)  # head_dim 24
    with pytest.raises(ConfigError, match="power of two >= 16"):
        validate(c)
    c = base_config()
    c.model.attention_impl = "pallas"
    c.data.seq_len = 100
    with pytest.raises(ConfigError, match="multiple of 16"):
        validate(c)
    c.data.seq_len = 256
    validate(c)  # the default shapes fit
