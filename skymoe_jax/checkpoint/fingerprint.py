"""Content fingerprints of a checkpoint's arrays, saved beside them and checked when they are read.

orbax stores each array as zstd-compressed zarr chunks, and nothing on the read path checks their bytes
(zstd frames carry no checksum; tensorstore's OCDBT checksums its b-tree, not the values). A changed byte
inside a chunk that still decompresses would restore as a changed tensor and a resumed run would train on
it without a word. A fingerprint per array, computed on the devices where the array lives, catches that.

The fingerprint is sum_i (bits_i XOR a_i) * w_i mod 2**32 over the array's elements in row-major order,
with bits_i the element's raw bits and a_i, w_i (w_i odd) fixed functions of the position i. Any change to
one element changes its term (an odd w_i is invertible mod 2**32), so it changes the sum; swapping two
elements changes their weights. uint32 addition is associative, so the value is the same on any mesh and
in any reduction order: a checkpoint saved on 8 devices is checked when read on 1. It is not a cryptographic
hash; it guards against damage, not against an adversary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _bits(a: jax.Array) -> jax.Array:
    """The raw bits of each element as uint32 (8-, 16- and 32-bit dtypes; 64-bit values fold both halves)."""
    if a.dtype == jnp.bool_:
        return a.astype(jnp.uint32)
    size = a.dtype.itemsize
    if size == 8:
        halves = jax.lax.bitcast_convert_type(a, jnp.uint32)  # [..., 2]
        return halves[..., 0] ^ (halves[..., 1] * jnp.uint32(0x9E3779B1))
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(a, unsigned).astype(jnp.uint32)


def _position(shape: tuple[int, ...]) -> jax.Array:
    """Each element's row-major index mod 2**32, built from iotas so a sharded array is never reshaped."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride % 2**32)
        stride *= shape[dim]
    return index


def _fingerprint(a: jax.Array) -> jax.Array:
    i = _position(a.shape)
    mixed = _bits(a) ^ (i * jnp.uint32(0x85EBCA6B) + jnp.uint32(0x27D4EB2F))
    weight = (i * jnp.uint32(0x9E3779B1) + jnp.uint32(0x165667B1)) | jnp.uint32(1)
    return jnp.sum(mixed * weight, dtype=jnp.uint32)


_fingerprints = jax.jit(lambda leaves: [_fingerprint(a) for a in leaves])


def fingerprints(named: dict[str, jax.Array]) -> dict[str, int]:
    """{name: fingerprint} of each array; every process of a multi-process run must call this together."""
    names = sorted(named)
    values = jax.device_get(_fingerprints([named[n] for n in names]))
    return {n: int(np.asarray(v)) for n, v in zip(names, values)}
