"""Accelerators a plan can target, and device-memory sizes given on the command line."""

from __future__ import annotations

import re

from skymoe_jax.errors import ConfigError

GIB = 2**30

# Memory per device in bytes, as CUDA reports it (nvidia-smi: 81,920 MiB on the 80 GB parts, 143,771 MiB
# on the H200).
DEVICE_MEMORY = {"A800-80GB": 80 * GIB, "A100-80GB": 80 * GIB, "H100-80GB": 80 * GIB, "H200": 143_771 * 2**20}

_UNITS = {"gb": 1e9, "gib": GIB, "tb": 1e12, "tib": 2**40}


def parse_device_memory(text: str) -> tuple[float, str]:
    """(bytes, label) from a device name (e.g. H100-80GB) or a size with its unit (80GB = 80e9 bytes,
    80GiB = 80 x 2^30)."""
    names = {name.lower(): name for name in DEVICE_MEMORY}
    if text.lower() in names:
        name = names[text.lower()]
        return float(DEVICE_MEMORY[name]), name
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", text)
    if not match or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"--device_memory={text!r} must be a size with its unit (80GB, 80GiB, 0.14TB) or one of "
                          f"{', '.join(DEVICE_MEMORY)}")
    return float(match.group(1)) * _UNITS[match.group(2).lower()], text
