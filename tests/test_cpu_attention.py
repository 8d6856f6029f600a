"""The CPU attention kernel (kernels/cpu_attention.py): values and gradients against a float64 reference on packed
batches of the default and odd shapes, that a sharded train step runs it per device and equals XLA's attention,
that `auto` picks it, and what happens where it cannot run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_chunked_attention import _dense, sharded_step

from skymoe_jax.config import load_config, validate
from skymoe_jax.errors import ConfigError
from skymoe_jax.kernels import cpu_attention, cpu_ffi
from skymoe_jax.model.attention import Attention, resolve_attention_impl
from skymoe_jax.model.spec import ModelSpec

needs_kernels = pytest.mark.skipif(not cpu_ffi.available(), reason="no C++ compiler or scipy-openblas64 here")


def _packed(b: int, s: int, h: int, kv: int, d: int, seed: int = 0):
    """Unit-normal q, k, v and segment ids of several packed documents a row (uneven lengths, one row whole)."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, s, n, d), dtype=np.float32) for n in (h, kv, kv))
    segments = np.zeros((b, s), np.int32)
    for row in range(1, b):
        cuts = np.sort(rng.choice(np.arange(1, s), size=min(3, s - 1), replace=False))
        segments[row] = np.searchsorted(cuts, np.arange(s), side="right")
    return q, k, v, segments


def _reference(q, k, v, segments, d_out):
    """Float64 attention and its gradients, written out (softmax Jacobian), independent of JAX."""
    q, k, v, d_out = (a.astype(np.float64) for a in (q, k, v, d_out))
    group = q.shape[2] // k.shape[2]
    kr, vr = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = q.shape[1]
    visible = (np.arange(s)[None, :] <= np.arange(s)[:, None]) & (segments[:, :, None] == segments[:, None, :])
    scale = q.shape[-1] ** -0.5
    scores = np.where(visible[:, None], np.einsum("bqhd,bkhd->bhqk", q, kr) * scale, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", p, vr)
    dp = np.einsum("bqhd,bkhd->bhqk", d_out, vr)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * scale
    dq = np.einsum("bhqk,bkhd->bqhd", ds, kr)
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q).reshape(k.shape[:2] + (k.shape[2], group, k.shape[3])).sum(3)
    dv = np.einsum("bhqk,bqhd->bkhd", p, d_out).reshape(dk.shape[:2] + (k.shape[2], group, k.shape[3])).sum(3)
    return out, dq, dk, dv


def _run(q, k, v, segments, d_out):
    def attend(q, k, v):
        return cpu_attention.cpu_attention(q, k, v, segments, "gshard")

    out, vjp = jax.vjp(attend, q, k, v)
    return (out, *vjp(d_out))


def _custom_calls(fn, *args) -> set[str]:
    text = jax.jit(fn).lower(*args).compile().as_text()
    return {t for t in (cpu_attention.FORWARD, cpu_attention.BACKWARD) if t in text}


@needs_kernels
@pytest.mark.parametrize(
    "shape",
    [
        (16, 256, 4, 2, 32),  # the default config's
        (4, 256, 4, 2, 64),  # the larger CPU config's head dimension
        (2, 100, 6, 3, 24),  # a sequence that is no multiple of the 64-query block, groups of 2
        (3, 7, 2, 1, 2),  # shorter than one block, one KV head
        (1, 130, 2, 2, 16),  # plain multi-head, a last block of 2 queries
    ],
)
def test_values_and_gradients_match_a_float64_reference(shape):
    q, k, v, segments = _packed(*shape)
    d_out = np.random.default_rng(1).standard_normal(q.shape, dtype=np.float32)
    got = jax.jit(_run)(q, k, v, segments, d_out)
    # float32 sums over up to S keys of O(1) terms, and an exp within 2 ulp: errors of about sqrt(S) * eps * |x|,
    # ~1e-6 here; a wrong mask, scale or head grouping moves O(0.1).
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, _reference(q, k, v, segments, d_out)):
        np.testing.assert_allclose(np.asarray(g), w, rtol=2e-5, atol=2e-5, err_msg=name)


@needs_kernels
def test_the_compiled_gradient_calls_both_kernels_and_equals_jaxs_dense_attention():
    q, k, v, segments = (jnp.asarray(a) for a in _packed(2, 96, 4, 2, 16, seed=3))

    def loss(attend):
        return lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, segments)))

    def kernel(q, k, v, s):
        return cpu_attention.cpu_attention(q, k, v, s, "gshard")

    grad = jax.grad(loss(kernel), argnums=(0, 1, 2))
    assert _custom_calls(grad, q, k, v) == {cpu_attention.FORWARD, cpu_attention.BACKWARD}
    want = jax.jit(jax.grad(loss(_dense), argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(jax.jit(grad)(q, k, v), want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=2e-6)


@needs_kernels
# gshard (data rows only) is the long profile's: EDP splits the heads over `expert` as well, the harder case.
@pytest.mark.parametrize("layout", [pytest.param("gshard", marks=pytest.mark.long), "edp"])
def test_sharded_train_step_with_the_kernel_equals_xla(layout):
    """Under the mesh the kernel runs per device (data rows; EDP's heads over `expert`); XLA's attention is
    partitioned by GSPMD instead. Same loss, same gradients up to float32 summation order."""
    (g_xla, _, m_xla), (g_cpu, _, m_cpu) = sharded_step("xla", layout), sharded_step("cpu", layout)
    np.testing.assert_allclose(m_cpu["loss"], m_xla["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_cpu), jax.tree.leaves(g_xla)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@needs_kernels
def test_auto_picks_the_kernel_on_the_cpu_in_float32_only():
    assert resolve_attention_impl("auto", 256, "cpu") == resolve_attention_impl("auto", 8192, "cpu") == "cpu"
    assert resolve_attention_impl("auto", 256) == "cpu"  # these tests run on the CPU
    assert resolve_attention_impl("auto", 256, "cpu", "bfloat16") == "blocked"
    assert resolve_attention_impl("auto", 256, "gpu") == "xla"
    assert resolve_attention_impl("blocked", 256, "cpu") == "blocked"


def test_without_the_kernels_auto_keeps_xlas_attention(monkeypatch):
    monkeypatch.setattr(cpu_ffi, "available", lambda: False)
    assert resolve_attention_impl("auto", 256, "cpu") == "blocked"
    assert resolve_attention_impl("auto", 1024, "cpu") == "chunked"


def test_asking_for_the_kernel_where_it_cannot_run_is_a_config_error(monkeypatch):
    c = load_config()
    c.model.update(attention_impl="cpu", dtype="bfloat16")
    with pytest.raises(ConfigError, match="model.attention_impl=cpu computes in float32"):
        validate(c)

    monkeypatch.setattr(cpu_ffi, "available", lambda: False)
    c = load_config()
    c.model.attention_impl = "cpu"
    attn = Attention(ModelSpec.from_config(c), nnx.Rngs(0), "gshard")
    x = jnp.zeros((1, 8, c.model.d_model), jnp.float32)
    ids = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ConfigError, match="use model.attention_impl=auto"):
        attn(x, ids, ids)


def test_bad_shapes_are_refused_and_a_direct_call_without_the_kernels_says_why(monkeypatch):
    q, k, v, segments = _packed(1, 8, 3, 2, 4)
    with pytest.raises(ValueError, match="KV dividing H"):
        cpu_attention.cpu_attention(q, k, v, segments, "gshard")
    monkeypatch.setattr(cpu_ffi, "available", lambda: False)
    q, k, v, segments = _packed(1, 8, 4, 2, 4)
    with pytest.raises(RuntimeError, match="unavailable here"):
        cpu_attention.cpu_attention(q, k, v, segments, "gshard")
