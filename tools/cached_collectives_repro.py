"""Reproduces XLA:CPU's deadlock of a train step loaded back from JAX's persistent compilation cache:

    python tools/cached_collectives_repro.py [STEPS]       # from the repository root or anywhere; default 300

It compiles the train step of the config fuzzer's seed 48 (a (1, 4, 2) gshard mesh over 8 simulated CPU devices,
dropless with the exact-count exchange) and runs it STEPS times, then loads the same step back from a temporary
persistent cache and runs it STEPS times more. With jaxlib 0.10.2 the fresh step runs through and the loaded one
stops within a few hundred steps: XLA ends the process after 30 s (exit 134), six or seven devices waiting in the
all-reduce of the loss's token count (`op_id=28`), outside the layer loop, and the others in the loop's all-gather
of an expert pair (`op_id=1`) for a partner that waits in that all-reduce. A jaxlib that prints two "steps in" lines
has fixed the loaded program's order, and run/compile_cache.py's `kept_out` can go (docs/development.md, "Tests and
fuzzing")."""

import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's package and the fuzzer's draws
os.environ["XLA_FLAGS"] = (
    "--xla_force_host_platform_device_count=8 --xla_cpu_collective_call_terminate_timeout_seconds=30"
)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402 - after XLA_FLAGS
import numpy as np  # noqa: E402
from test_fuzz_config import RUN, _flags, draw  # noqa: E402

from skymoe_jax.config import apply_overrides, base_config  # noqa: E402
from skymoe_jax.training import runtime as runtime_lib  # noqa: E402
from skymoe_jax.training.compiled import BATCH_DTYPES  # noqa: E402


def batch(config) -> dict[str, np.ndarray]:
    """One batch of random tokens, every position counted."""
    shape = (config.data.batch_size, config.data.seq_len)
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, shape)
    columns = {"inputs": tokens, "targets": tokens, "positions": np.broadcast_to(np.arange(shape[1]), shape)}
    return {k: columns.get(k, np.ones(shape)).astype(dtype) for k, dtype in BATCH_DTYPES.items()}


def run(config, steps: int, label: str) -> None:
    runtime = runtime_lib.build(config)
    with jax.set_mesh(runtime.mesh):
        state, inputs = runtime.init(), runtime.batch(batch(config))
        step = runtime.train_step.lower(state, inputs).compile()
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, inputs)
            bool(metrics["finite"])  # waits for the step, as the train loop's finite guard does
        print(f"{label}: {steps} steps in {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="cached-collectives-"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    config = apply_overrides(base_config(), _flags(draw(48)["overrides"]) + RUN)
    run(config, steps, "compiled")  # and written to the cache
    jax.clear_caches()  # the next compile of the same step reads it back
    run(config, steps, "loaded from the cache")
