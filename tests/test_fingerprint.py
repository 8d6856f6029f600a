"""Checkpoint fingerprints: the formula against a numpy reference, the same value on any mesh, and a change to
any one element (or an exchange of two) changing it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from skymoe_jax.checkpoint.fingerprint import fingerprints


def _reference(a: np.ndarray) -> int:
    """sum_i (bits_i ^ a_i) * w_i mod 2**32 in Python integers, positions in row-major order."""
    bits = a.reshape(-1).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize]).astype(np.uint64)
    i = np.arange(bits.size, dtype=np.uint64)
    mixed = bits ^ ((i * 0x85EBCA6B + 0x27D4EB2F) % 2**32)
    weight = ((i * 0x9E3779B1 + 0x165667B1) % 2**32) | 1
    return int(sum(int(m) * int(w) for m, w in zip(mixed, weight)) % 2**32)


ARRAYS = {
    "f32": np.random.default_rng(0).normal(size=(4, 6, 5)).astype(np.float32),
    "bf16": np.random.default_rng(1).normal(size=(3, 8)).astype(jnp.bfloat16),
    "i32": np.arange(-5, 12, dtype=np.int32),
    "scalar": np.asarray(7, np.int32),
}


def test_fingerprints_equal_the_numpy_reference():
    got = fingerprints({k: jnp.asarray(v) for k, v in ARRAYS.items()})
    assert got == {k: _reference(v) for k, v in ARRAYS.items()}


@pytest.mark.parametrize("spec", [P("a", "b"), P(None, "a"), P("b", None, "a")])
def test_sharded_arrays_have_the_unsharded_fingerprint(spec):
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    a = np.random.default_rng(2).normal(size=(8, 12, 4)).astype(np.float32)
    sharded = jax.device_put(a, NamedSharding(mesh, spec))
    assert fingerprints({"x": sharded}) == {"x": _reference(a)}


def test_any_changed_element_or_exchange_changes_the_fingerprint():
    a = ARRAYS["f32"]
    base = fingerprints({"x": jnp.asarray(a)})["x"]
    rng = np.random.default_rng(3)
    for _ in range(16):  # one bit anywhere: the smallest damage a disk or a copy can do
        changed = a.copy()
        changed.reshape(-1).view(np.uint32)[rng.integers(a.size)] ^= np.uint32(1 << int(rng.integers(32)))
        assert fingerprints({"x": jnp.asarray(changed)})["x"] != base
    swapped = a.copy().reshape(-1)
    swapped[[3, 17]] = swapped[[17, 3]]
    assert fingerprints({"x": jnp.asarray(swapped.reshape(a.shape))})["x"] != base
