"""The CPU weight-gradient kernel (kernels/cpu_matmul.py): its values against a float64 reference, that XLA
calls it, and what happens where it cannot be built."""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from skymoe_jax.kernels import cpu_matmul

needs_kernel = pytest.mark.skipif(not cpu_matmul.available(), reason="no C++ compiler or scipy-openblas64 here")


def _operands(b: int, c: int, m: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((b, c, m), dtype=np.float32), rng.standard_normal((b, c, n), dtype=np.float32)


def _reference(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    return np.einsum("bcm,bcn->bmn", x.astype(np.float64), g.astype(np.float64))


def _custom_calls(fn, *args) -> list[str]:
    return [line for line in jax.jit(fn).lower(*args).compile().as_text().splitlines() if cpu_matmul.TARGET in line]


@needs_kernel
@pytest.mark.parametrize("shape", [(8, 1280, 128, 256), (16, 640, 256, 256), (1, 37, 5, 3), (3, 1, 7, 2)])
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
def test_gradients_through_the_expert_ffn_use_the_kernel_and_match_the_einsum(monkeypatch):
    from skymoe_jax.model.moe import experts

    rng = np.random.default_rng(2)
    w = experts.ExpertWeights(
        *(jnp.asarray(rng.normal(0, 0.1, s), jnp.float32) for s in [(4, 16, 32)] * 2 + [(4, 32, 16)])
    )
    x = jnp.asarray(rng.normal(size=(4, 40, 16)), jnp.float32)

    def loss(w, x):
        return jnp.sum(jnp.sin(experts.batched(w, x)))

    grads = jax.jit(jax.grad(loss))(w, x)
    assert len(_custom_calls(jax.grad(loss), w, x)) == 3  # gate, up and down
    monkeypatch.setattr(experts, "trans_a_matmul", lambda a, b: jnp.einsum("bcm,bcn->bmn", a, b))
    expected = jax.jit(jax.grad(loss))(w, x)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_other_dtypes_and_empty_operands_take_the_einsum_and_bad_shapes_are_refused():
    x, g = (a.astype(jnp.bfloat16) for a in _operands(2, 8, 4, 3))
    assert not _custom_calls(cpu_matmul.trans_a_matmul, x, g)
    x, g = _operands(2, 0, 4, 3)
    assert not _custom_calls(cpu_matmul.trans_a_matmul, x, g)
    assert not np.asarray(cpu_matmul.trans_a_matmul(x, g)).any()
    with pytest.raises(ValueError, match="takes"):
        cpu_matmul.trans_a_matmul(*_operands(2, 8, 4, 3)[:1], _operands(2, 9, 4, 3)[1])


def test_without_a_compiler_the_kernel_is_off_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(cpu_matmul, "compiler", lambda: None)
    with caplog.at_level(logging.INFO, logger=cpu_matmul.__name__):
        assert cpu_matmul.available.__wrapped__() is False
    assert "C++ compiler" in caplog.text
    monkeypatch.setattr(cpu_matmul, "available", lambda: False)
    x, g = _operands(2, 8, 4, 3)
    assert not _custom_calls(cpu_matmul.trans_a_matmul, x, g)
    np.testing.assert_allclose(np.asarray(cpu_matmul.trans_a_matmul(x, g)), _reference(x, g), rtol=1e-5, atol=1e-5)


def test_without_openblas_or_when_opted_out_the_kernel_is_off(monkeypatch):
    monkeypatch.setattr(cpu_matmul, "openblas_library", lambda: None)
    assert cpu_matmul.available.__wrapped__() is False
    monkeypatch.undo()
    monkeypatch.setenv(cpu_matmul.OPT_OUT, "0")
    assert cpu_matmul.available.__wrapped__() is False


def test_a_failed_build_is_reported_and_leaves_the_einsum(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("SKYMOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_matmul, "SOURCE", str(tmp_path / "broken.cc"))
    (tmp_path / "broken.cc").write_text("this is not C++\n")
    monkeypatch.setattr(cpu_matmul, "openblas_library", lambda: "/nonexistent/libopenblas.so")
    monkeypatch.setattr(cpu_matmul, "compiler", lambda: "g++")
    if cpu_matmul.shutil.which("g++") is None:
        pytest.skip("no g++ to fail with")
    with caplog.at_level(logging.WARNING, logger=cpu_matmul.__name__):
        assert cpu_matmul.available.__wrapped__() is False
    assert "did not build or load" in caplog.text
    assert not list((tmp_path / "ffi").glob("*.so")), "a failed build left a file to load"


def test_the_compiler_is_given_jaxs_ffi_headers_and_no_machine_specific_flags():
    command = cpu_matmul.compile_command("g++", "k.cc", "k.so")
    assert f"-I{jax.ffi.include_dir()}" in command and {"-shared", "-fPIC"} <= set(command)
    assert not [arg for arg in command if arg.startswith(("-march", "-mtune", "-mcpu"))]
    assert os.path.exists(os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "ffi.h"))


@needs_kernel
def test_a_built_kernel_is_reused_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SKYMOE_CACHE_DIR", str(tmp_path))
    blas, cxx = cpu_matmul.openblas_library(), cpu_matmul.compiler()
    path = cpu_matmul._build(cxx, blas)
    built = os.stat(path).st_mtime_ns
    monkeypatch.setattr(cpu_matmul, "compile_command", lambda *a: pytest.fail("compiled again"))
    assert cpu_matmul._build(cxx, blas) == path and os.stat(path).st_mtime_ns == built
    assert sorted(p.name for p in (tmp_path / "ffi").iterdir()) == [os.path.basename(path)]
