"""Devices to compile for that need not be here: XLA:GPU's compile-only devices for a named GPU, or this machine's CPUs.

JAX's CUDA plugin compiles for a GPU described by a GpuTargetConfigProto without one being attached
(`jax.experimental.topologies`); the protos for the device table's GPUs ship in gpu_targets/. The plugin
(`pip install 'skymoe-jax[aot]'`: jax-cuda12-plugin at jaxlib's version) is not in the default install, and on a
machine without a GPU it runs under JAX_PLATFORMS=cpu, which skips its check for CUDA; `skymoe` sets that itself
for a compile-only command.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import jax

from skymoe_jax.errors import ConfigError
from skymoe_jax.parallel.devices import DEVICES

HERE = os.path.join(os.path.dirname(__file__), "gpu_targets")
TARGET_FILES = {
    "A800-80GB": "a800-80gb.txtpb",
    "A100-80GB": "a100-80gb.txtpb",
    "H100-80GB": "h100-80gb.txtpb",
    "H200": "h200.txtpb",
}
TARGETS = ("cpu", *TARGET_FILES)


def canonical(target: str) -> str:
    """The target's name as the device table spells it (case-insensitive match), or 'cpu'."""
    for name in TARGETS:
        if name.lower() == target.lower():
            return name
    raise ConfigError(f"--compile={target!r} is not a target; use one of {', '.join(TARGETS)}")


def platform(target: str) -> str:
    """cpu or gpu: what the program is compiled for, which decides the platform's choices (attention, kernels)."""
    return "cpu" if canonical(target) == "cpu" else "gpu"


def memory(target: str) -> float | None:
    """Bytes of memory of one device of the target (None for the CPU)."""
    name = canonical(target)
    return None if name == "cpu" else DEVICES[name].memory


def target_config(target: str) -> str:
    """The GpuTargetConfigProto text of a GPU target."""
    with open(os.path.join(HERE, TARGET_FILES[canonical(target)]), encoding="utf-8") as f:
        return f.read()


def plugin_available() -> bool:
    """Whether JAX's CUDA plugin is installed, so XLA:GPU can compile here."""
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None


def devices(target: str, count: int) -> list[jax.Device]:
    """`count` devices to compile for: compile-only GPUs of the target, or this process's CPU devices."""
    name = canonical(target)
    if name == "cpu":
        local = jax.devices("cpu")
        if count > len(local):
            raise ConfigError(
                f"compiling for {count} CPU devices needs as many here ({len(local)}); "
                f"set XLA_FLAGS=--xla_force_host_platform_device_count={count}"
            )
        return local[:count]
    return list(_gpu_devices(name, count))


@functools.cache
def _gpu_devices(name: str, count: int) -> tuple[jax.Device, ...]:
    if not plugin_available():
        raise ConfigError(
            f"compiling for {name} needs JAX's CUDA plugin: pip install 'skymoe-jax[aot]' "
            "(jax-cuda12-plugin at the version of jaxlib)"
        )
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=target_config(name), topology=f"1x1x{count}"
        )
    except NotImplementedError:
        raise ConfigError(
            f"compiling for {name}: JAX's CUDA plugin did not start (it stops at its check for CUDA where there is "
            "no GPU); run with JAX_PLATFORMS=cpu"
        ) from None
    return tuple(topology.devices)


def compile_only() -> None:
    """Start JAX on the CPU alone unless told otherwise (JAX_PLATFORMS), so the CUDA plugin serves compile-only
    devices on a machine without a GPU. Call before anything starts JAX's backends."""
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")
