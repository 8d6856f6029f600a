"""Tiny MoE on the built-in corpus (Python standard library sources, byte tokens).

Trains on a 2-core CPU in a few minutes: 4 layers, width 128, 8 experts top-2
with gating logit normalization and adaptive aux-loss coefficients.
"""

from skymoe_jax.config import base_config


def get_config():
    config = base_config()
    config.name = "default"
    # Four layers compile quickly unrolled, and unrolled the step is ~10% faster on the CPU: no scan
    # buffers stacking every layer's residuals (docs/BENCHMARKS.md, "CPU step against the PyTorch peer").
    config.model.scan_layers = False
    # On the CPU the host's memory is the device's: an asynchronous save keeps a second copy of the state beside
    # the next steps, and the run's peak RSS rose 50-60 MiB after each save; writing this state takes 0.15 s.
    config.train.async_checkpointing = False
    return config
