"""The weight gradient of a batched matmul on the CPU, through a small compiled kernel (cpu_matmul.cc).

`trans_a_matmul(x, g)` is `einsum("bcm,bcn->bmn", x, g)`. On the CPU it calls OpenBLAS (the scipy-openblas64
package: a copy of its own, so numpy's BLAS keeps its threads) through `jax.ffi`, one single-threaded sgemm per
batch entry on XLA's intra-op pool; everywhere else, and on a CPU where the kernel cannot be built or loaded,
it is the einsum. The expert FFN's backward takes its three weight gradients from it: XLA gives that dot to
Eigen, 30-40% slower per core than OpenBLAS on these shapes (docs/BENCHMARKS.md).

The kernel is compiled on first use with the C++ compiler at hand (`CXX`, else g++, else c++) against JAX's FFI
headers, into ~/.cache/skymoe_jax/ffi (`SKYMOE_CACHE_DIR` moves it), one file per source, jaxlib version and
OpenBLAS library, and loaded from there afterwards. SKYMOE_CPU_KERNELS=0 keeps the einsum.
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

from skymoe_jax.kernels.common import vary_like

SOURCE = os.path.join(os.path.dirname(__file__), "cpu_matmul.cc")
TARGET = "skymoe_trans_a_matmul"
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
    """The C++ compiler to build the kernel with: $CXX, else g++, else c++; None where there is none."""
    return next(filter(None, (shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++") if c)), None)


def compile_command(cxx: str, source: str, output: str) -> list[str]:
    """The compiler's arguments. No -march: the file may be shared by machines of other CPUs (a cluster's home
    directory), and the arithmetic is OpenBLAS's, which picks its kernels for the CPU at run time."""
    return [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}", source, "-o", output, "-ldl"]


def cache_dir() -> str:
    base = os.environ.get("SKYMOE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "skymoe_jax")
    return os.path.join(base, "ffi")


def _build(cxx: str, blas: str) -> str:
    """Path of the compiled kernel for this source, jaxlib and OpenBLAS library, compiling it when absent."""
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + importlib.metadata.version("jaxlib").encode() + blas.encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"cpu_matmul-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    # Compiled beside its final name and renamed: processes starting together each build, and none loads a
    # half-written file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=cache_dir())
    os.close(fd)
    try:
        subprocess.run(compile_command(cxx, SOURCE, partial), check=True, capture_output=True, text=True)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


@functools.cache
def available() -> bool:
    """Whether the kernel is built, loaded and registered with XLA's CPU backend (once per process)."""
    if os.environ.get(OPT_OUT) == "0":
        return False
    blas, cxx = openblas_library(), compiler()
    if blas is None or cxx is None:
        missing = "OpenBLAS library (the scipy-openblas64 package)" if blas is None else "C++ compiler (g++ or $CXX)"
        log.info("CPU weight-gradient kernel off: no %s found; XLA's dot is used", missing)
        return False
    try:
        library = ctypes.CDLL(_build(cxx, blas))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("CPU weight-gradient kernel off: it did not build or load (%s); XLA's dot is used", detail[-300:])
        return False
    if library.skymoe_cpu_matmul_init(blas.encode()) != 0:
        log.warning("CPU weight-gradient kernel off: %s lacks cblas_sgemm; XLA's dot is used", blas)
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.SkymoeTransAMatmul), platform="cpu")
    return True


def _einsum(x: jax.Array, g: jax.Array) -> jax.Array:
    return jnp.einsum("bcm,bcn->bmn", x, g)


def _kernel(x: jax.Array, g: jax.Array) -> jax.Array:
    # Inside shard_map the call's result varies over no mesh axis, and in a backward pass (where the mesh is not
    # in context) out_struct cannot declare it to; it is cast to its operands' axes after the call instead.
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], x.shape[2], g.shape[2]), jnp.float32))(x, g)
    return vary_like(out, x, g)


def trans_a_matmul(x: jax.Array, g: jax.Array) -> jax.Array:
    """x [B, C, M], g [B, C, N] -> [B, M, N] = x[b]^T g[b]: the compiled kernel for float32 on the CPU, the
    einsum otherwise (other platforms and dtypes, empty operands)."""
    if x.ndim != 3 or g.ndim != 3 or x.shape[:2] != g.shape[:2]:
        raise ValueError(f"trans_a_matmul takes [B, C, M] and [B, C, N]; got {x.shape} and {g.shape}")
    float32 = x.dtype == g.dtype == jnp.float32
    if float32 and 0 not in x.shape + g.shape and jax.default_backend() == "cpu" and available():
        return _kernel(x, g)
    return _einsum(x, g)
