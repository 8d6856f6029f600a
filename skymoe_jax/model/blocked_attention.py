"""Causal attention over packed documents that skips the key blocks above the diagonal.

The queries are cut into blocks of about QUERY_BLOCK tokens; block i attends to the keys up to its own
end only, so the scores cover (n + 1) / 2n of the [S, S] square (62.5% at 4 blocks) instead of all of
it. Each block is an ordinary softmax over its keys: the probabilities are normalized after the value
product (a [.., D] division instead of one over [.., keys]). Memory is still quadratic in S, so it serves
the short sequences below model/attention.py's CPU_CHUNKED_FROM; chunked attention takes over from there.

Measured on the 2-core CPU (docs/BENCHMARKS.md, "CPU step against the PyTorch peer"): forward + backward
of the default shapes (16 x 256 tokens, 4 heads / 2 KV heads of 32) about 2x faster than
jax.nn.dot_product_attention with a [B, 1, S, S] mask. A hand-written FlashAttention-style gradient was
no faster than autodiff's. Unmeasured on a GPU, so `auto` picks it on the CPU only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from skymoe_jax.model.chunked_attention import block_size

# 64 was fastest at S = 256 of 32, 64, 128 and 256 (one block: the dense path): smaller blocks skip more
# but make the matmuls too small for the CPU's GEMM.
QUERY_BLOCK = 64
# A finite stand-in for -inf (as jax.nn.dot_product_attention uses): exp underflows to exactly 0.
_MASKED = -0.7 * float(np.finfo(np.float32).max)


def query_block(seq_len: int) -> int:
    """The query block for a sequence: a divisor of it near QUERY_BLOCK, or the whole sequence when the
    only divisors are too small to make matmuls worth running."""
    block = block_size(seq_len, QUERY_BLOCK)
    return block if block >= QUERY_BLOCK // 4 else seq_len


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v, causal within each document: q [B, S, H, D], k and v [B, S, KV, D] with H a
    multiple of KV (grouped queries), segment_ids [B, S] -> [B, S, H, D]."""
    b, s, h, d = q.shape
    kv = k.shape[2]
    grouped = (q * jnp.asarray(d**-0.5, q.dtype)).reshape(b, s, kv, h // kv, d)
    block = query_block(s)
    outs = []
    for start in range(0, s, block):
        end = start + block
        scores = jnp.einsum("bqkgd,bjkd->bkgqj", grouped[:, start:end], k[:, :end], preferred_element_type=jnp.float32)
        causal = jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :]
        same_doc = segment_ids[:, start:end, None] == segment_ids[:, None, :end]
        # lax.select rather than jnp.where, whose inner jit hides the fill's broadcast from the planner's
        # residual count (parallel/activations.py saved_bytes).
        visible = jnp.broadcast_to((causal & same_doc)[:, None, None], scores.shape)
        scores = jax.lax.select(visible, scores, jnp.full_like(scores, _MASKED))
        # The row maximum only keeps exp in range; treating it as a constant leaves the gradient exact.
        weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
        unnormalized = jnp.einsum(
            "bkgqj,bjkd->bkgqd", weights.astype(v.dtype), v[:, :end], preferred_element_type=jnp.float32
        )
        # Every query sees itself, so the sum is at least 1.
        out = unnormalized / weights.sum(-1)[..., None]
        outs.append(out.transpose(0, 3, 1, 2, 4).reshape(b, end - start, h, d).astype(q.dtype))
    return jnp.concatenate(outs, axis=1)
