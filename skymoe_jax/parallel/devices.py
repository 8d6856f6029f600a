"""Accelerators a plan can target, and device-memory sizes given on the command line."""

from __future__ import annotations

import dataclasses
import re

from skymoe_jax.errors import ConfigError
from skymoe_jax.metrics.flops import PEAK_FLOPS

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    memory: float  # bytes, as CUDA reports them
    peak_flops: float  # dense bf16, from the data sheet
    intra_node: float  # bytes/s one GPU sends to the others of its node (NVLink, one direction)
    inter_node: float  # bytes/s one GPU sends off its node (its share of the node's network)
    per_node: int = 8
    memory_bandwidth: float = 0.0  # bytes/s of device memory (HBM), from the data sheet; 0 where not known


# nvidia-smi reports 81,920 MiB on the 80 GB parts and 143,771 MiB on the H200. A800: NVLink cut to
# 400 GB/s (200 each way); the clusters Skywork-MoE describes give each GPU a 200 Gb/s HDR link.
# H100 / H200 SXM: NVLink 900 GB/s (450 each way), 400 Gb/s NDR per GPU. HBM: 2,039 GB/s on the 80 GB A100 / A800
# SXM, 3.35 TB/s on the H100 SXM, 4.8 TB/s on the H200.
DEVICES = {
    d.name: d
    for d in (
        Device("A800-80GB", 80 * GIB, PEAK_FLOPS["a800"], intra_node=200e9, inter_node=25e9, memory_bandwidth=2039e9),
        Device("A100-80GB", 80 * GIB, PEAK_FLOPS["a100"], intra_node=300e9, inter_node=25e9, memory_bandwidth=2039e9),
        Device("H100-80GB", 80 * GIB, PEAK_FLOPS["h100"], intra_node=450e9, inter_node=50e9, memory_bandwidth=3.35e12),
        Device("H200", 143_771 * 2**20, PEAK_FLOPS["h200"], intra_node=450e9, inter_node=50e9, memory_bandwidth=4.8e12),
    )
}

_UNITS = {"kb": 1e3, "kib": 2**10, "mb": 1e6, "mib": 2**20, "gb": 1e9, "gib": GIB, "tb": 1e12, "tib": 2**40}


def find_device(name: str) -> Device:
    for known, device in DEVICES.items():
        if known.lower() == name.lower():
            return device
    raise ConfigError(f"--device={name!r} is not in the device table; use one of {', '.join(DEVICES)}")


def parse_device_memory(text: str) -> tuple[float, str]:
    """(bytes, label) from a device name (e.g. H100-80GB) or a size with its unit (80GB = 80e9 bytes,
    80GiB = 80 x 2^30)."""
    if text.lower() in (name.lower() for name in DEVICES):
        device = find_device(text)
        return device.memory, device.name
    return parse_size(text, "device_memory", f" or one of {', '.join(DEVICES)}"), text


def parse_size(text: str, flag: str, alternatives: str = "") -> float:
    """Bytes from a size with its unit: 80GB = 80e9, 80GiB = 80 x 2^30, 500MB, 0.14TB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", text)
    if not match or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"--{flag}={text!r} must be a size with its unit (500MB, 80GB, 80GiB, 0.14TB){alternatives}")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]
