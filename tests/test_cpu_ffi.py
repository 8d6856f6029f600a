"""How the C++ CPU kernels are built, cached and loaded (kernels/cpu_ffi.py), and that every way they can be
unavailable turns them off with a reason instead of failing."""

from __future__ import annotations

import logging
import os

import jax
import pytest

from skymoe_jax.kernels import cpu_ffi

needs_kernels = pytest.mark.skipif(not cpu_ffi.available(), reason="no C++ compiler or scipy-openblas64 here")


def test_without_a_compiler_the_kernels_are_off_and_say_why(monkeypatch, caplog):
    monkeypatch.setattr(cpu_ffi, "compiler", lambda: None)
    with caplog.at_level(logging.INFO, logger=cpu_ffi.__name__):
        assert cpu_ffi.available.__wrapped__() is False
    assert "C++ compiler" in caplog.text


def test_without_openblas_or_when_opted_out_the_kernels_are_off(monkeypatch):
    monkeypatch.setattr(cpu_ffi, "openblas_library", lambda: None)
    assert cpu_ffi.available.__wrapped__() is False
    monkeypatch.undo()
    monkeypatch.setenv(cpu_ffi.OPT_OUT, "0")
    assert cpu_ffi.available.__wrapped__() is False


def test_a_failed_build_is_reported_and_turns_the_kernels_off(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("SKYMOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_ffi, "SOURCES", (str(tmp_path / "broken.cc"),))
    (tmp_path / "broken.cc").write_text("this is not C++\n")
    monkeypatch.setattr(cpu_ffi, "openblas_library", lambda: "/nonexistent/libopenblas.so")
    monkeypatch.setattr(cpu_ffi, "compiler", lambda: "g++")
    if cpu_ffi.shutil.which("g++") is None:
        pytest.skip("no g++ to fail with")
    with caplog.at_level(logging.WARNING, logger=cpu_ffi.__name__):
        assert cpu_ffi.available.__wrapped__() is False
    assert "did not build or load" in caplog.text
    assert not list((tmp_path / "ffi").glob("*.so")), "a failed build left a file to load"


def test_the_compiler_is_given_jaxs_ffi_headers_and_no_machine_specific_flags():
    command = cpu_ffi.compile_command("g++", ("a.cc", "b.cc"), "k.so")
    assert f"-I{jax.ffi.include_dir()}" in command and {"-shared", "-fPIC"} <= set(command)
    assert not [arg for arg in command if arg.startswith(("-march", "-mtune", "-mcpu"))]
    assert os.path.exists(os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "ffi.h"))


@needs_kernels
def test_a_built_library_is_reused_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SKYMOE_CACHE_DIR", str(tmp_path))
    blas, cxx = cpu_ffi.openblas_library(), cpu_ffi.compiler()
    path = cpu_ffi._build(cxx, blas)
    built = os.stat(path).st_mtime_ns
    monkeypatch.setattr(cpu_ffi, "compile_command", lambda *a: pytest.fail("compiled again"))
    assert cpu_ffi._build(cxx, blas) == path and os.stat(path).st_mtime_ns == built
    assert sorted(p.name for p in (tmp_path / "ffi").iterdir()) == [os.path.basename(path)]
