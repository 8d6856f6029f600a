"""The CPU weight-gradient kernel (kernels/cpu_matmul.py): its values against a float64 reference, that XLA
calls it (the dense projections' weight gradients on one device included), and the einsum where the kernels are
off (how they build: test_cpu_ffi.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from skymoe_jax.kernels import cpu_ffi, cpu_matmul

needs_kernel = pytest.mark.skipif(not cpu_ffi.available(), reason="no C++ compiler or scipy-openblas64 here")


def _operands(b: int, c: int, m: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((b, c, m), dtype=np.float32), rng.standard_normal((b, c, n), dtype=np.float32)


def _reference(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    return np.einsum("bcm,bcn->bmn", x.astype(np.float64), g.astype(np.float64))


def _custom_calls(fn, *args) -> list[str]:
    return [line for line in jax.jit(fn).lower(*args).compile().as_text().splitlines() if cpu_matmul.TARGET in line]


@needs_kernel
# (1, 300, 48, 200): one expert, as a dense layer's gradient, whose 200 columns are three parts of 80, 80 and 40.
@pytest.mark.parametrize(
    "shape", [(8, 1280, 128, 256), (16, 640, 256, 256), (1, 300, 48, 200), (1, 37, 5, 3), (3, 1, 7, 2)]
)
def test_kernel_matches_a_float64_reference(shape):
    x, g = _operands(*shape)
    out = jax.jit(cpu_matmul.trans_a_matmul)(x, g)
    ref = _reference(x, g)
    assert _custom_calls(cpu_matmul.trans_a_matmul, x, g), "the compiled step does not call the kernel"
    # A float32 sum of C products of unit normals rounds each of its C partial sums (of size about sqrt(C)) at
    # about eps * sqrt(C): about eps * C in all, whatever order the BLAS adds in.
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=2 * shape[1] * np.finfo(np.float32).eps)


@needs_kernel
def test_kernel_inside_shard_map_over_8_devices_matches_the_einsum():
    mesh = jax.make_mesh((8,), ("data",))
    x, g = _operands(8, 96, 16, 24, seed=1)
    rows = jax.sharding.NamedSharding(mesh, P("data"))

    def local(x, g):
        return cpu_matmul.trans_a_matmul(x, g)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data"))
    out = jax.jit(sharded)(jax.device_put(x, rows), jax.device_put(g, rows))
    assert _custom_calls(sharded, jax.device_put(x, rows), jax.device_put(g, rows))
    np.testing.assert_allclose(np.asarray(out), _reference(x, g), rtol=0, atol=2 * 96 * np.finfo(np.float32).eps)


@needs_kernel
@pytest.mark.parametrize(
    "spec, x_shape, w_shape",
    [
        ("bsd,dhk->bshk", (2, 24, 16), (16, 4, 8)),  # the attention's query, key and value projections
        ("bshk,hkd->bsd", (2, 24, 4, 8), (4, 8, 16)),  # its output projection
        ("...d,df->...f", (3, 5, 7, 16), (16, 20)),  # a dense feed-forward's, over any leading axes
    ],
)
def test_dense_projections_take_their_weight_gradient_from_the_kernel(spec, x_shape, w_shape):
    """layers.project on one device: the einsum's value, and its gradients against a float64 reference, the weight's
    from the kernel; across a mesh of two devices XLA's own dots (the partitioner would gather a call's operands)."""
    from skymoe_jax.model.layers import project

    rng = np.random.default_rng(5)
    x, w = (rng.standard_normal(s, dtype=np.float32) for s in (x_shape, w_shape))
    dy = rng.standard_normal(np.einsum(spec, x, w).shape, dtype=np.float32)

    def run(x, w):
        y, vjp = jax.vjp(lambda x, w: project(spec, x, w), x, w)
        return (y, *vjp(dy))

    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    contracted = (w.ndim - dy.ndim + x.ndim) // 2
    lead, outs = x.ndim - contracted, w.ndim - contracted
    want = (
        np.einsum(spec, x64, w64),
        np.tensordot(dy64, w64, (list(range(lead, dy.ndim)), list(range(w.ndim - outs, w.ndim)))),
        np.tensordot(x64, dy64, (list(range(lead)), list(range(lead)))),
    )
    assert _custom_calls(run, x, w), "the weight gradient does not call the kernel"
    for got, ref in zip(jax.jit(run)(x, w), want):
        # float32 sums of at most 105 unit-normal products: errors ~ sqrt(terms) * eps * their size, far below this.
        np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=2 * 105 * np.finfo(np.float32).eps)
    with jax.set_mesh(jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])):
        assert not _custom_calls(run, x, w)
        np.testing.assert_allclose(np.asarray(jax.jit(run)(x, w)[2]), want[2], rtol=1e-5, atol=1e-5)


@needs_kernel
def test_rows_past_those_in_use_are_skipped():
    """used [B, K]: of each entry's K runs of C / K rows only a prefix counts. The einsum of operands zeroed past
    it is the reference; rows past it that are not zero (which the callers never pass) show they were skipped."""
    x, g = _operands(3, 60, 5, 4, seed=3)
    used = np.array([[0, 20, 7], [20, 20, 20], [1, 0, 19]], np.int32)
    keep = (np.arange(20)[None, None, :] < used[:, :, None]).reshape(3, 60, 1)
    out = jax.jit(cpu_matmul.trans_a_matmul)(x, g, used)
    np.testing.assert_allclose(
        np.asarray(out), _reference(x * keep, g * keep), rtol=0, atol=2 * 60 * np.finfo(np.float32).eps
    )
    with pytest.raises(ValueError, match="K dividing C"):
        cpu_matmul.trans_a_matmul(x, g, np.ones((3, 7), np.int32))


@pytest.mark.parametrize("kernels", [pytest.param(True, marks=needs_kernel), False])
def test_rows_sorted_by_expert_contract_each_experts_rows(monkeypatch, kernels):
    """x [A, M], g [A, N] with group sizes [E] (the dropless layout): expert e's rows contracted; sizes of 0, 1 and
    a rest, and two rows past their sum that count for no expert. Without the kernels, XLA's ragged dot."""
    if not kernels:
        monkeypatch.setattr(cpu_ffi, "available", lambda: False)
    x, g = (a[0] for a in _operands(1, 40, 5, 4, seed=4))
    sizes = np.array([0, 1, 37, 0], np.int32)
    fresh = lambda *a: cpu_matmul.trans_a_matmul(*a)  # a function no jit has traced with the other setting
    out = jax.jit(fresh)(x, g, sizes)
    assert bool(_custom_calls(fresh, x, g, sizes)) is kernels
    starts = np.cumsum(sizes) - sizes
    want = np.stack([_reference(x[None, s : s + n], g[None, s : s + n])[0] for s, n in zip(starts, sizes)])
    np.testing.assert_allclose(np.asarray(out), want, rtol=0, atol=2 * 40 * np.finfo(np.float32).eps)


def test_other_dtypes_and_empty_operands_take_the_einsum_and_bad_shapes_are_refused():
    x, g = (a.astype(jnp.bfloat16) for a in _operands(2, 8, 4, 3))
    assert not _custom_calls(cpu_matmul.trans_a_matmul, x, g)
    x, g = _operands(2, 0, 4, 3)
    assert not _custom_calls(cpu_matmul.trans_a_matmul, x, g)
    assert not np.asarray(cpu_matmul.trans_a_matmul(x, g)).any()
    with pytest.raises(ValueError, match="takes"):
        cpu_matmul.trans_a_matmul(*_operands(2, 8, 4, 3)[:1], _operands(2, 9, 4, 3)[1])


def test_without_the_kernels_the_einsum_runs(monkeypatch):
    monkeypatch.setattr(cpu_ffi, "available", lambda: False)
    x, g = _operands(2, 8, 4, 3)
    assert not _custom_calls(cpu_matmul.trans_a_matmul, x, g)
    np.testing.assert_allclose(np.asarray(cpu_matmul.trans_a_matmul(x, g)), _reference(x, g), rtol=1e-5, atol=1e-5)
