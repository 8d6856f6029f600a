"""Test setup: 8 simulated CPU devices, so sharding and expert parallelism run for real."""

import os
import shutil
import tempfile

# The simulated devices are threads that meet at every collective, and XLA ends the process when they have not
# all arrived within 40 s ("Termination timeout ... of 40 seconds exceeded"): a loaded 2-core machine reached that
# in the long fuzz run. A real hang still ends, after 10 minutes.
FLAGS = {"--xla_force_host_platform_device_count": "8", "--xla_cpu_collective_call_terminate_timeout_seconds": "600"}
# The tests compile hundreds of small programs and run each for a few steps, so LLVM's optimisation of the
# generated code costs more than it saves: at level 0 the suite took 16% less CPU time (docs/development.md). Both
# sides of every comparison in the suite compile at the same level; level 0 rounds some results differently from
# XLA's default 3 in the last bits, so a test comparing with the default names it (tests/test_runtime.py). A
# developer's own XLA_FLAGS setting of the level wins.
OPTIMIZATION = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a process a test starts with `devices` CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {OPTIMIZATION}"


_own = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.split("=")[0] not in FLAGS]
if not any(f.startswith(OPTIMIZATION.split("=")[0]) for f in _own):
    _own.append(OPTIMIZATION)
os.environ["XLA_FLAGS"] = " ".join(_own + [f"{k}={v}" for k, v in FLAGS.items()])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# A persistent compilation cache for this pytest process, new each run, here and in the `skymoe` processes
# its tests start (they inherit the environment): many tests compile the same small programs again (a resumed
# run, `skymoe eval` after `skymoe train`, the reference step of each mesh; train() and evaluate() keep programs over
# several CPU devices out, run/compile_cache.py). Measured on the 2-core machine before that,
# it took the checkpoint, CLI and upcycling tests from 333 to 257 s. XLA compiles the same module with the
# same options to the same executable, so a test sees what a fresh compile would have given it (but for the
# order of a several-device program's collectives, which XLA:CPU loses on loading). A size limit
# makes JAX lock the cache (with filelock) around each read and write, as the processes of a multi-process
# test write it at the same time.
CACHE_DIR = tempfile.mkdtemp(prefix="skymoe-tests-xla-cache-")
os.environ.update(
    JAX_COMPILATION_CACHE_DIR=CACHE_DIR,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    JAX_COMPILATION_CACHE_MAX_SIZE=str(4 << 30),
)

import pytest  # noqa: E402  (after XLA_FLAGS: nothing may import jax before they are set)

# JAX's CUDA plugin (the aot extra, which .ci/run installs for the XLA:GPU compile tests) logs from C++ that it found
# no CUDA driver whenever a process imports JAX on a machine without a GPU: lines of JAX's, not of the command's.
JAX_PLUGIN_NOISE = ("cudart_stub.cc", "WARNING: All log messages before absl::InitializeLog() is called")


def own_stderr(text: str) -> str:
    """A process's stderr without the CUDA plugin's start-up lines."""
    return "".join(line for line in text.splitlines(keepends=True) if not any(n in line for n in JAX_PLUGIN_NOISE))


LONG = "SKYMOE_LONG"


def pytest_unconfigure(config):
    shutil.rmtree(CACHE_DIR, ignore_errors=True)


def pytest_configure(config):
    config.addinivalue_line("markers", f"long: a case the default run leaves to the long profile ({LONG}=1)")


def pytest_collection_modifyitems(config, items):
    """Cases marked long repeat a property a default case already checks, on another mesh or setting; the
    default run skips them to stay near 20 minutes on 2 cores, SKYMOE_LONG=1 runs them."""
    if os.environ.get(LONG) == "1":
        return
    skip = pytest.mark.skip(reason=f"long profile ({LONG}=1)")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)
