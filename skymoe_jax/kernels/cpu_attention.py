"""Causal grouped-query attention within packed documents on the CPU, through a compiled kernel
(cpu_attention.cc; built and loaded by cpu_ffi.py), forward and backward.

`cpu_attention(q, k, v, segment_ids)` computes what model/blocked_attention.py and chunked_attention.py do. Each
(batch row, head) is a task on XLA's intra-op pool that takes 64 queries at a time against the keys up to their
block's end, with OpenBLAS sgemms for the products and vectorized loops for the mask and softmax; the forward
keeps each row's log-sum-exp and the backward recomputes the probabilities from it, so the saved residuals are
q, k, v, the output and [B, H, S] floats, and the memory is linear in the sequence. XLA's own attention on the CPU
runs the head dimension's small matmuls at 35-45 GFLOP/s and keeps the probabilities for the backward
(docs/BENCHMARKS.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from skymoe_jax.kernels import cpu_ffi
from skymoe_jax.kernels.attention import per_device

FORWARD, BACKWARD = "skymoe_attention_fwd", "skymoe_attention_bwd"


def _check(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> None:
    b, s, h, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, s) or k.shape[3] != d or h % k.shape[2] or segment_ids.shape != (b, s):
        raise ValueError(
            f"cpu_attention takes q [B, S, H, D], k and v [B, S, KV, D] with KV dividing H, segment ids [B, S]; got "
            f"{q.shape}, {k.shape}, {v.shape}, {segment_ids.shape}"
        )


def _forward(q, k, v, segment_ids):
    b, s, h, _ = q.shape
    out_types = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, h, s), jnp.float32))
    return jax.ffi.ffi_call(FORWARD, out_types)(q, k, v, segment_ids)


@jax.custom_vjp
def _attention(q, k, v, segment_ids):
    return _forward(q, k, v, segment_ids)[0]


def _attention_fwd(q, k, v, segment_ids):
    out, lse = _forward(q, k, v, segment_ids)
    return out, (q, k, v, segment_ids, out, lse)


def _attention_bwd(residuals, d_out):
    q, k, v, segment_ids, out, lse = residuals
    out_types = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    dq, dk, dv = jax.ffi.ffi_call(BACKWARD, out_types)(q, k, v, segment_ids, out, lse, d_out)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def cpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, layout: str) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v, causal within each document: q [B, S, H, D] float32, k and v [B, S, KV, D] with
    KV dividing H, segment_ids [B, S] -> [B, S, H, D]; per device under a mesh (layout: parallel.layout). Where
    the kernels are unavailable it raises; `cpu_ffi.usable(q, k, v)` says beforehand."""
    _check(q, k, v, segment_ids)
    cpu_ffi.require("cpu_attention")
    return per_device(_attention, q, k, v, segment_ids.astype(jnp.int32), layout)
