"""Everything compiled for one mesh: sharded init, train step and eval step.

The train loop, `skymoe eval` and `skymoe bench step` all run through here, so they
compile the same functions with the same shardings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax.training import state as state_lib
from skymoe_jax.training.state import TrainState
from skymoe_jax.training.step import make_eval_step, make_train_step

# The init program runs once. On the CPU, LLVM's default O3 spends about 2 of its 3 s of compilation on the
# per-parameter random initializers for nothing: O1 compiles in a third of the time and gives bit-identical
# values (tests/test_runtime.py; docs/BENCHMARKS.md, "Start-up"). Unmeasured elsewhere, so CPU only.
CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


@dataclasses.dataclass
class Runtime:
    mesh: Mesh
    layout: str
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    shardings: TrainState  # a TrainState of NamedShardings
    init: Callable[[], TrainState]
    train_step: Callable  # (state, batch) -> (state, metrics); donates state
    eval_step: Callable  # (params, batch, bias) -> sums

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and target shardings of the state, for restoring a checkpoint onto this mesh."""
        return mesh_lib.with_shardings(jax.eval_shape(self.init), self.shardings)

    def batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return mesh_lib.global_batch(local, self.mesh, self.layout)


def build(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Runtime:
    """Compile-ready functions for config on a mesh over devices (default: all). Trace them under
    `jax.set_mesh(runtime.mesh)`: the MoE layer finds the mesh there."""
    mesh = mesh_lib.make_mesh(config, devices)
    mesh_lib.check_process_rows(mesh, config.parallel.layout, config.data.batch_size, config.data.num_streams)
    graphdef, init, tx = state_lib.create(config)
    with jax.set_mesh(mesh):
        shardings = mesh_lib.state_shardings(jax.eval_shape(init), mesh, config)
    replicated = NamedSharding(mesh, P())
    batch = mesh_lib.batch_sharding(mesh, config.parallel.layout)
    # ZeRO-1 / FSDP: gradients take the optimizer state's sharding, so XLA reduce-scatters them.
    split_grads = config.parallel.zero1 or config.parallel.fsdp
    grad_shardings = (
        mesh_lib.tree_shardings(jax.eval_shape(init).params, mesh, mesh_lib.optimizer_rules(config.parallel))
        if split_grads
        else None
    )
    train_step = jax.jit(
        make_train_step(graphdef, tx, config, grad_shardings),
        in_shardings=(shardings, batch),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        make_eval_step(graphdef, config),
        in_shardings=(shardings.params, batch, shardings.bias),
        out_shardings=replicated,
    )
    return Runtime(
        mesh=mesh,
        layout=config.parallel.layout,
        graphdef=graphdef,
        tx=tx,
        shardings=shardings,
        init=jax.jit(init, out_shardings=shardings, compiler_options=init_compiler_options(mesh)),
        train_step=train_step,
        eval_step=eval_step,
    )


def init_compiler_options(mesh: Mesh) -> dict[str, int] | None:
    """XLA options for compiling the init program on this mesh's platform (None: XLA's defaults)."""
    return CPU_INIT_COMPILER_OPTIONS if mesh.devices.flat[0].platform == "cpu" else None
