"""JAX's persistent compilation cache for train() and evaluate() (`skymoe train`, `skymoe eval`, notebooks).

A second run of the same config on the same devices loads its init, train and eval programs instead of
compiling them: 5-8 s of the default `skymoe train` on 2 CPU cores (docs/BENCHMARKS.md, "Start-up").
JAX keys every entry on the program, the devices, the compile options and the jax and jaxlib versions, so
an entry is only reused where a fresh compile would build the same executable. With several processes,
JAX writes from one of them and the others read.

Programs over more than one CPU device are not written (`kept_out`): XLA:CPU (jaxlib 0.10.2) loads a program back
from the cache without the order between a collective outside a loop or branch and those inside it, which a fresh
compile keeps, so the devices can take them in different orders and deadlock (docs/development.md, "Tests and
fuzzing").
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Iterator

import jax
from jax.sharding import Mesh

from skymoe_jax.errors import ConfigError

# Least recently used entries go past this size. The default config's programs take under 1 MB.
MAX_BYTES = 2 << 30


def enable(directory: str) -> str | None:
    """Point the cache at directory (train.compilation_cache_dir; '' leaves it off) unless one is already
    chosen, by JAX_COMPILATION_CACHE_DIR, jax.config or an earlier call, which wins: JAX opens the cache
    once per process, at the first compile after a directory is set. Returns the directory in use, or None.
    """
    chosen = jax.config.jax_compilation_cache_dir
    if chosen:
        return chosen
    if not directory:
        return None
    path = os.path.expanduser(directory)
    try:
        os.makedirs(path, exist_ok=True)
        problem = "" if os.access(path, os.W_OK) else "is not writable"
    except OSError as e:
        problem = f"cannot be created ({e.strerror})"
    if problem:
        raise ConfigError(
            f"train.compilation_cache_dir={directory} {problem}; point it at a writable directory, "
            "or set it to '' to compile every run"
        )
    jax.config.update("jax_compilation_cache_dir", path)
    # JAX bounds the cache only with filelock installed, and fails at the first compile without it: a
    # dependency here, but an environment installed with --no-deps (the GPU machine's) may lack it.
    if jax.config.jax_compilation_cache_max_size == -1 and importlib.util.find_spec("filelock"):
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path


def loads_safely(mesh: Mesh) -> bool:
    """Whether this mesh's programs run as compiled when loaded back from the cache: not on more than one CPU
    device, where the loaded program's collectives lose their order (module docstring)."""
    return mesh.devices.size == 1 or mesh.devices.flat[0].platform != "cpu"


@contextlib.contextmanager
def kept_out(mesh: Mesh) -> Iterator[None]:
    """Programs compiled in this context are not written to the cache where the mesh's would not load safely, so
    a later run compiles them afresh instead of loading them."""
    if loads_safely(mesh):
        yield
        return
    # JAX writes an entry only when its compile took at least this long: the one switch it reads at each write.
    name = "jax_persistent_cache_min_compile_time_secs"
    before = getattr(jax.config, name)
    jax.config.update(name, math.inf)
    try:
        yield
    finally:
        jax.config.update(name, before)
