"""Builds, loads and registers the package's C++ CPU kernels (cpu_matmul.cc, cpu_attention.cc, cpu_expert_ffn.cc)
with XLA.

The kernels call OpenBLAS (the scipy-openblas64 package: a copy of its own, so numpy's BLAS keeps its threads)
and run their work as tasks on XLA's intra-op pool. They are compiled into one library on first use with the C++
compiler at hand (`CXX`, else g++, else c++) against JAX's FFI headers, into ~/.cache/skymoe_jax/ffi
(`SKYMOE_CACHE_DIR` moves it), one file per source, jaxlib version and OpenBLAS library, and loaded from there
afterwards. Where the library cannot be built or loaded, or SKYMOE_CPU_KERNELS=0, `available()` is False and each
kernel's caller takes XLA's own path, with a log line saying why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp

from skymoe_jax.kernels import common

HERE = os.path.dirname(__file__)
SOURCES = tuple(os.path.join(HERE, name) for name in ("cpu_matmul.cc", "cpu_attention.cc", "cpu_expert_ffn.cc"))
HEADERS = tuple(os.path.join(HERE, name) for name in ("cpu_blas.h", "cpu_common.h"))
# XLA custom-call targets and the library symbols of their handlers.
TARGETS = {
    "skymoe_trans_a_matmul": "SkymoeTransAMatmul",
    "skymoe_attention_fwd": "SkymoeAttentionForward",
    "skymoe_attention_bwd": "SkymoeAttentionBackward",
    "skymoe_expert_ffn_fwd": "SkymoeExpertFfnForward",
    "skymoe_expert_ffn_bwd": "SkymoeExpertFfnBackward",
}
OPT_OUT = "SKYMOE_CPU_KERNELS"

log = logging.getLogger(__name__)


def openblas_library() -> str | None:
    """The scipy-openblas64 package's shared library, or None where it is not installed."""
    try:
        import scipy_openblas64
    except ImportError:
        return None
    stem = os.path.join(scipy_openblas64.get_lib_dir(), f"lib{scipy_openblas64.get_library()}")
    return next((stem + ext for ext in (".so", ".dylib") if os.path.exists(stem + ext)), None)


def compiler() -> str | None:
    """The C++ compiler to build the kernels with: $CXX, else g++, else c++; None where there is none."""
    return next(filter(None, (shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++") if c)), None)


def compile_command(cxx: str, sources: tuple[str, ...], output: str) -> list[str]:
    """The compiler's arguments. No -march: the file may be shared by machines of other CPUs (a cluster's home
    directory); the matmuls are OpenBLAS's, which picks its kernels for the CPU at run time, and the attention's
    row loops carry clones for AVX-512 and AVX2 that the loader picks from. -fopenmp-simd honours the loops' simd
    pragmas without linking an OpenMP runtime."""
    include = f"-I{jax.ffi.include_dir()}"
    return [cxx, "-O3", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", include, *sources, "-o", output, "-ldl"]


def cache_dir() -> str:
    base = os.environ.get("SKYMOE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "skymoe_jax")
    return os.path.join(base, "ffi")


def _build(cxx: str, blas: str) -> str:
    """Path of the compiled library for these sources, jaxlib and OpenBLAS library, compiling it when absent."""
    digest = hashlib.sha256(importlib.metadata.version("jaxlib").encode() + blas.encode())
    for name in SOURCES + HEADERS:
        with open(name, "rb") as f:
            digest.update(f.read())
    path = os.path.join(cache_dir(), f"cpu_kernels-{digest.hexdigest()[:16]}.so")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    # Compiled beside its final name and renamed: processes starting together each build, and none loads a
    # half-written file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=cache_dir())
    os.close(fd)
    try:
        subprocess.run(compile_command(cxx, SOURCES, partial), check=True, capture_output=True, text=True)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


@functools.cache
def available() -> bool:
    """Whether the kernels are built, loaded and registered with XLA's CPU backend (once per process)."""
    if os.environ.get(OPT_OUT) == "0":
        return False
    blas, cxx = openblas_library(), compiler()
    if blas is None or cxx is None:
        missing = "OpenBLAS library (the scipy-openblas64 package)" if blas is None else "C++ compiler (g++ or $CXX)"
        log.info("CPU kernels off: no %s found; XLA's own ops are used", missing)
        return False
    try:
        library = ctypes.CDLL(_build(cxx, blas))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("CPU kernels off: they did not build or load (%s); XLA's own ops are used", detail[-300:])
        return False
    if library.skymoe_cpu_kernels_init(blas.encode()) != 0:
        log.warning("CPU kernels off: %s lacks cblas_sgemm; XLA's own ops are used", blas)
        return False
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return True


def require(kernel: str) -> None:
    """Loads the kernels for a direct call of one of them, or says why it cannot run."""
    if not available():
        raise RuntimeError(
            f"the CPU kernel {kernel} is unavailable here (SKYMOE_CPU_KERNELS=0, or no C++ compiler or "
            "scipy-openblas64: the log says which); check kernels.cpu_ffi.usable before calling it"
        )


def usable(*operands: jax.Array) -> bool:
    """Whether a kernel can take these operands: all float32 (integer ids aside) and non-empty, on the CPU
    platform (of the program being traced), with the library available."""
    floats = [x for x in operands if jnp.issubdtype(x.dtype, jnp.floating)]
    return (
        all(x.dtype == jnp.float32 for x in floats)
        and all(x.size for x in operands)
        and common.platform() == "cpu"
        and available()
    )
