"""Blocked causal attention (model/blocked_attention.py) against the dense reference on packed batches: values
and gradients for sequences cut into several query blocks, uneven ones and one block; bfloat16; and which
implementation `auto` picks on which platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_chunked_attention import _dense, _grads, _inputs

from skymoe_jax.kernels import cpu_ffi
from skymoe_jax.model.attention import resolve_attention_impl
from skymoe_jax.model.blocked_attention import blocked_attention, query_block


# 4 blocks of 64 (the default shapes' 256), 3 of 64, 2 of 50, and a prime length that stays one block.
@pytest.mark.parametrize("s", [256, 192, 100, 61])
def test_values_and_gradients_equal_the_dense_reference(s):
    q, k, v, segments = _inputs(s=s)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    # Jitted: run op by op, the blocks' many small ops took 5-12 s a case on the 2-core machine.
    got = jax.jit(blocked_attention)(q, k, v, segments)
    np.testing.assert_allclose(got, jax.jit(_dense)(q, k, v, segments), rtol=1e-5, atol=1e-5)
    want = _grads(lambda q, k, v: _dense(q, k, v, segments), weights)(q, k, v)
    got = _grads(lambda q, k, v: blocked_attention(q, k, v, segments), weights)(q, k, v)
    # float32 sums over fewer keys in another order: ~1e-6 on O(1) values; a wrong mask moves O(0.1).
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_query_blocks():
    assert [query_block(s) for s in (256, 192, 100, 61, 512)] == [64, 64, 50, 61, 64]


def test_bfloat16_inputs_stay_close_to_the_float32_reference():
    q, k, v, segments = _inputs(s=128, dtype=jnp.bfloat16)
    got = jax.jit(blocked_attention)(q, k, v, segments)
    assert got.dtype == jnp.bfloat16
    wide = [a.astype(jnp.float32) for a in (q, k, v)]
    # Scores and sums are float32 inside; the probabilities enter the value product in bfloat16 (2^-8).
    np.testing.assert_allclose(np.asarray(got, np.float32), jax.jit(_dense)(*wide, segments), rtol=2e-2, atol=2e-2)


def test_auto_picks_blocked_on_the_cpu_only_and_chunked_for_long_sequences(monkeypatch):
    # Where the CPU kernels are off (test_cpu_attention.py covers auto with them).
    monkeypatch.setattr(cpu_ffi, "available", lambda: False)
    assert resolve_attention_impl("auto", 256, "cpu") == "blocked"
    assert resolve_attention_impl("auto", 256, "gpu") == "xla"
    assert resolve_attention_impl("auto", 1024, "cpu") == resolve_attention_impl("auto", 1024, "gpu") == "chunked"
    # From 512 tokens on the CPU, where chunked attention skips the blocks above the diagonal in four blocks.
    assert (resolve_attention_impl("auto", 512, "cpu"), resolve_attention_impl("auto", 512, "gpu")) == (
        "chunked",
        "xla",
    )
    assert resolve_attention_impl("xla", 256, "cpu") == "xla"
    assert resolve_attention_impl("auto", 256) == "blocked"  # these tests run on the CPU
