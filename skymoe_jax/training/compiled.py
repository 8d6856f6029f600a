"""A config's train step compiled for devices that need not be here (parallel/targets.py: compile-only GPUs, or this
machine's CPUs), and what XLA's buffer assignment says it needs per device."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax.training import runtime as runtime_lib

BATCH_DTYPES = {
    "inputs": np.int32,
    "targets": np.int32,
    "positions": np.int32,
    "segment_ids": np.int32,
    "loss_mask": np.float32,
}


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device, from `compiled.memory_analysis()`."""

    arguments: int
    outputs: int
    aliased: int  # outputs written over donated arguments (the train state)
    temporaries: int

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries

    @classmethod
    def of(cls, compiled: jax.stages.Compiled) -> Memory:
        m = compiled.memory_analysis()
        return cls(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes, m.temp_size_in_bytes)


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    compiled: jax.stages.Compiled
    memory: Memory
    seconds: float  # lowering and compiling
    devices: int
    device_kind: str


def abstract_batch(config: ml_collections.ConfigDict, runtime: runtime_lib.Runtime) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch's shapes, dtypes and sharding, as the train step receives it."""
    sharding = mesh_lib.batch_sharding(runtime.mesh, runtime.layout)
    shape = (config.data.batch_size, config.data.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, dtype in BATCH_DTYPES.items()}


def compile_steps(
    config: ml_collections.ConfigDict, devices: Sequence[jax.Device], steps: Sequence[str] = ("train",)
) -> dict[str, CompiledStep]:
    """The train and/or eval step of config on a mesh over `devices`, lowered and compiled without running anything;
    each step's seconds include building the runtime once."""
    start = time.perf_counter()
    rt = runtime_lib.build(config, devices)
    built = time.perf_counter() - start
    state, batch = rt.abstract_state(), abstract_batch(config, rt)
    programs = {
        "train": lambda: rt.train_step.lower(state, batch),
        "eval": lambda: rt.eval_step.lower(state.params, batch, state.bias),
    }
    out = {}
    with jax.set_mesh(rt.mesh):
        for name in steps:
            start = time.perf_counter()
            compiled = programs[name]().compile()
            seconds = built + time.perf_counter() - start
            out[name] = CompiledStep(compiled, Memory.of(compiled), seconds, len(devices), devices[0].device_kind)
    return out


def compile_train_step(config: ml_collections.ConfigDict, devices: Sequence[jax.Device]) -> CompiledStep:
    """The train step of config on a mesh over `devices`, lowered and compiled without running anything."""
    return compile_steps(config, devices)["train"]
