"""skymoe-jax: a JAX/Flax trainer for Mixture-of-Experts language models (Skywork-MoE techniques)."""

import importlib

# The public API, each imported on first use: `import skymoe_jax` imports no JAX, so the `skymoe` command can
# start itself again cheaply with the host-heap settings it needs (run/host_memory.py).
_API = {
    "ModelSpec": ("skymoe_jax.model.spec", "ModelSpec"),
    "Transformer": ("skymoe_jax.model.transformer", "Transformer"),
    "base_config": ("skymoe_jax.config", "base_config"),
    "build_model": ("skymoe_jax.model.transformer", "build_model"),
    "evaluate": ("skymoe_jax.run.loop", "evaluate"),
    "get_config": ("skymoe_jax.config", "load_config"),
    "load_model": ("skymoe_jax.checkpoint.load", "load_model"),
    "sample": ("skymoe_jax.run.sample", "sample"),
    "train": ("skymoe_jax.run.loop", "train"),
    "upcycle": ("skymoe_jax.checkpoint.upcycle", "upcycle"),
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'skymoe_jax' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
