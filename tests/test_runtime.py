"""The compiled init: on the CPU it is compiled at LLVM O1 (a third of the compile time), which must not
change a single bit of the initial state the default config trains from."""

import jax
import numpy as np

from skymoe_jax.config import load_config
from skymoe_jax.training import runtime as runtime_lib
from skymoe_jax.training import state as state_lib


def test_the_cpu_init_is_compiled_at_o1_and_gives_the_same_bits_as_xla_defaults(monkeypatch):
    config = load_config("configs/default.py", [])
    jit_options = {}
    real_jit = jax.jit

    def recording_jit(fun, **kwargs):
        jit_options[fun.__name__] = kwargs.get("compiler_options")
        return real_jit(fun, **kwargs)

    monkeypatch.setattr(runtime_lib.jax, "jit", recording_jit)
    runtime = runtime_lib.build(config)
    monkeypatch.undo()
    assert jit_options["init"] == {"xla_backend_optimization_level": 1}
    assert runtime_lib.init_compiler_options(runtime.mesh) == {"xla_backend_optimization_level": 1}

    _, init, _ = state_lib.create(config)
    with jax.set_mesh(runtime.mesh):
        fast = runtime.init()
        # XLA's default level, named: the test run's own is 0 (tests/conftest.py), which rounds differently.
        reference = jax.jit(
            init, out_shardings=runtime.shardings, compiler_options={"xla_backend_optimization_level": 3}
        )()
    leaves, ref_leaves = jax.tree.leaves(fast), jax.tree.leaves(reference)
    assert len(leaves) == len(ref_leaves) > 30
    for a, b in zip(leaves, ref_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
