"""The CPU expert-FFN kernel (kernels/cpu_expert_ffn.py): the experts' output and gradients (the weights' included,
which the backward kernel sums over each expert's blocks) against a float64 reference at the default config's
shapes and odd ones, on slot buffers and on rows sorted by expert, that the compiled gradient runs it, and XLA's
einsums where the kernels are off."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skymoe_jax.kernels import cpu_expert_ffn, cpu_ffi, cpu_matmul
from skymoe_jax.model.moe import experts

needs_kernels = pytest.mark.skipif(not cpu_ffi.available(), reason="no C++ compiler or scipy-openblas64 here")


def _operands(e: int, c: int, d: int, f: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    # Weights at the init's scale: the gates' pre-activations are O(1), both sides of the sigmoid.
    w = experts.ExpertWeights(
        rng.normal(0, d**-0.5, (e, d, f)).astype(np.float32),
        rng.normal(0, d**-0.5, (e, d, f)).astype(np.float32),
        rng.normal(0, f**-0.5, (e, f, d)).astype(np.float32),
    )
    x = rng.standard_normal((e, c, d), dtype=np.float32)
    return w, x, rng.standard_normal((e, c, d), dtype=np.float32)


def _reference(w, x, dy):
    """Float64 SwiGLU experts and their gradients, written out."""
    wg, wu, wd, x, dy = (a.astype(np.float64) for a in (*w, x, dy))
    gate, up = x @ wg, x @ wu
    s = 1 / (1 + np.exp(-gate))
    h = gate * s * up
    dh = dy @ wd.transpose(0, 2, 1)
    d_gate, d_up = dh * up * s * (1 + gate * (1 - s)), dh * gate * s
    t = np.swapaxes
    grads = (t(x, 1, 2) @ d_gate, t(x, 1, 2) @ d_up, t(h, 1, 2) @ dy)
    return h @ wd, grads, d_gate @ t(wg, 1, 2) + d_up @ t(wu, 1, 2)


def _run(w, x, dy, used=None):
    y, vjp = jax.vjp(lambda w, x: experts.batched(w, x, used), w, x)
    return (y, *vjp(dy))


def _partly_used(x, dy, segments: int, seed: int = 0):
    """x and dy with each expert's rows cut into `segments` runs, of which a random prefix is in use and the rest
    zero (empty slots, which get no gradient); and the rows in use [E, segments]."""
    e, c, _ = x.shape
    run = c // segments
    used = np.random.default_rng(seed).integers(0, run + 1, (e, segments)).astype(np.int32)
    used[0, 0], used[-1, -1] = 0, run  # an empty run and a full one
    keep = (np.arange(run)[None, None, :] < used[:, :, None]).reshape(e, c, 1)
    return x * keep, dy * keep, used


@needs_kernels
@pytest.mark.parametrize(
    "shape",
    [
        (8, 1280, 128, 256),  # the default config's slot buffers: 5 blocks of 256 rows an expert
        (3, 530, 16, 24),  # rows in use split into blocks of 176 and 177 rows
        (2, 5, 4, 2),  # less than one block
    ],
)
@pytest.mark.parametrize("segments", [None, 1, 5])  # every row in use; a prefix of each expert's; of each of 5 runs
def test_output_and_gradients_match_a_float64_reference(shape, segments):
    w, x, dy = _operands(*shape)
    used = None
    if segments and shape[1] % segments == 0:
        x, dy, used = _partly_used(x, dy, segments)
    elif segments:
        pytest.skip("the rows do not split into these runs")
    y, d_w, dx = jax.jit(_run)(w, x, dy, used)
    want_y, want_dw, want_dx = _reference(w, x, dy)
    e, c, d, f = shape
    # float32 sums of d (or f, or C for the weight gradients) O(1) products: errors ~ sqrt(terms) * eps * |x|, with
    # the exp within 2 ulp; a wrong transpose, block offset or sigmoid derivative moves O(1).
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=0, atol=8 * np.sqrt(f) * eps * np.abs(want_y).max())
    np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=0, atol=8 * np.sqrt(f) * eps * np.abs(want_dx).max())
    for got, want in zip(d_w, want_dw):
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=8 * np.sqrt(c) * eps * np.abs(want).max())
    if used is not None:  # the skipped rows come out exactly zero, as the matmuls of zero rows give
        empty = ~(np.arange(c // used.shape[1])[None, None, :] < used[:, :, None]).reshape(e, c)
        assert not np.asarray(y)[empty].any() and not np.asarray(dx)[empty].any()


@needs_kernels
# Empty experts, one row, a block and a bit (two blocks of 129 and 130 rows); then every row in one expert; and rows
# past the sizes' sum.
@pytest.mark.parametrize("sizes, spare", [((0, 1, 259, 7, 0), 0), ((0, 0, 300, 0, 0), 3)])
def test_sorted_rows_with_group_sizes_match_a_float64_reference(sizes, spare):
    """The dropless layout: rows sorted by expert [A, d] with group sizes [E] (experts.ragged), each expert's rows
    against the float64 reference of that expert alone."""
    w, _, _ = _operands(len(sizes), 1, 16, 24)
    rng = np.random.default_rng(4)
    x, dy = (rng.standard_normal((sum(sizes) + spare, 16), dtype=np.float32) for _ in range(2))
    group_sizes = np.array(sizes, np.int32)
    y, vjp = jax.jit(lambda w, x: jax.vjp(lambda w, x: experts.ragged(w, x, group_sizes), w, x))(w, x)
    d_w, dx = vjp(dy)
    eps = np.finfo(np.float32).eps
    start = 0
    for e, n in enumerate(sizes):
        rows = slice(start, start + n)
        want_y, want_dw, want_dx = _reference([a[e : e + 1] for a in w], x[None, rows], dy[None, rows])
        # Tolerances as in the test above; the weight gradients of an expert with no rows are exactly zero.
        np.testing.assert_allclose(
            np.asarray(y)[rows], want_y[0], rtol=0, atol=8 * np.sqrt(24) * eps * np.abs(want_y).max(initial=1)
        )
        np.testing.assert_allclose(
            np.asarray(dx)[rows], want_dx[0], rtol=0, atol=8 * np.sqrt(24) * eps * np.abs(want_dx).max(initial=1)
        )
        for got, want in zip(d_w, want_dw):
            np.testing.assert_allclose(
                np.asarray(got)[e], want[0], rtol=0, atol=8 * np.sqrt(max(n, 1)) * eps * np.abs(want).max(initial=1)
            )
        start += n
    assert not np.asarray(y)[start:].any() and not np.asarray(dx)[start:].any()  # rows of no expert


@needs_kernels
def test_the_compiled_gradient_runs_both_kernels_and_no_separate_weight_gradient():
    """The backward kernel adds the weight gradients block by block: no other matmul of the rows remains."""
    w, x, dy = _operands(4, 40, 16, 32, seed=1)
    text = jax.jit(_run).lower(w, x, dy, jnp.full((4, 2), 20, jnp.int32)).compile().as_text()
    assert cpu_expert_ffn.FORWARD in text and cpu_expert_ffn.BACKWARD in text
    assert cpu_matmul.TARGET not in text and " dot(" not in text


def test_without_the_kernels_the_einsums_run_and_agree(monkeypatch):
    w, x, dy = _operands(3, 130, 16, 24, seed=2)
    kernel = jax.jit(_run)(w, x, dy)
    monkeypatch.setattr(cpu_ffi, "available", lambda: False)
    text = jax.jit(lambda *a: _run(*a)).lower(w, x, dy).compile().as_text()
    assert cpu_expert_ffn.FORWARD not in text and cpu_matmul.TARGET not in text
    einsum = jax.jit(lambda *a: _run(*a))(w, x, dy)
    for got, want in zip(jax.tree.leaves(kernel), jax.tree.leaves(einsum)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@needs_kernels
# One device is in the long profile: (1, 4, 2) runs the same kernels on rows that also cross the all-to-all.
@pytest.mark.parametrize("mesh", [pytest.param((1, 1, 1), marks=pytest.mark.long), (1, 4, 2)])
def test_a_train_step_with_the_kernels_equals_one_without(monkeypatch, mesh):
    """The kernels in a whole MoE train step, against XLA's einsums: routing groups of 16 tokens at capacity
    factor 1.0 drop assignments and leave slots empty, so the rows the kernels skip are real; on (1, 4, 2) the
    slots (and the rows in use) come from other devices through the all-to-all."""
    from test_parallel import _config, _step

    def step():
        c = _config(mesh, "gshard")
        c.model.attention_impl = "xla"  # only the experts' kernels differ
        return _step(c, jax.devices()[: int(np.prod(mesh))])

    g_kernel, _, m_kernel = step()
    monkeypatch.setattr(cpu_ffi, "available", lambda: False)
    g_xla, _, m_xla = step()
    assert np.any(np.asarray(m_xla["drop_rate"]) > 0)
    np.testing.assert_allclose(m_kernel["loss"], m_xla["loss"], rtol=1e-6)
    # As in test_parallel: float32 gradients summed in another order.
    for a, b in zip(jax.tree.leaves(g_kernel), jax.tree.leaves(g_xla)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@needs_kernels
def test_the_default_configs_step_with_the_kernels_equals_one_without(monkeypatch):
    """The built-in default (4 layers, 16 x 256 tokens, 8 experts, capacity factor 1.25) as `skymoe train` runs
    it, attention and experts on the CPU kernels, against the same step on XLA's ops."""
    from test_parallel import _step

    from skymoe_jax.config import load_config

    g_kernel, _, m_kernel = _step(load_config(), jax.devices()[:1])
    monkeypatch.setattr(cpu_ffi, "available", lambda: False)
    g_xla, _, m_xla = _step(load_config(), jax.devices()[:1])
    np.testing.assert_allclose(m_kernel["loss"], m_xla["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_kernel["drop_rate"], m_xla["drop_rate"], atol=1e-3)
    # float32 sums in another order through four layers: each gradient within 1e-3 of its norm (an assignment
    # that a rounding tie moved to another expert would change a few rows, well under that; a wrong row or
    # mask changes O(1) of it).
    for a, b in zip(jax.tree.leaves(g_kernel), jax.tree.leaves(g_xla)):
        assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(b)
