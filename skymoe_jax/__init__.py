"""skymoe-jax: a JAX/Flax trainer for Mixture-of-Experts language models (Skywork-MoE techniques)."""

from skymoe_jax.checkpoint.load import load_model
from skymoe_jax.checkpoint.upcycle import upcycle
from skymoe_jax.config import base_config
from skymoe_jax.config import load_config as get_config
from skymoe_jax.model.spec import ModelSpec
from skymoe_jax.model.transformer import Transformer, build_model
from skymoe_jax.run.loop import evaluate, train

__all__ = [
    "ModelSpec",
    "Transformer",
    "base_config",
    "build_model",
    "evaluate",
    "get_config",
    "load_model",
    "train",
    "upcycle",
]
