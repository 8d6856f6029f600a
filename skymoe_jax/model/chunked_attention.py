"""Causal attention over packed documents in memory linear in the sequence length.

The keys are taken a block at a time with an online softmax (running maximum and sum per query),
so no [S, S] score matrix exists: the forward keeps [S, block] scores, and the backward recomputes
them block by block from the saved log-sum-exp (the FlashAttention recurrence) instead of keeping
the probabilities, so what a layer saves for the backward pass is q, k, v, the output and one
float per query and head. Plain JAX (no kernel), so it runs and shards wherever XLA does.

Every query block is computed against every key block (masked where the key is later or in
another document): the same FLOPs as the dense path, since skipping blocks above the diagonal
would need a loop over query blocks too.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def block_size(seq_len: int, preferred: int = 512) -> int:
    """The largest divisor of seq_len not above `preferred`: blocks must tile the sequence."""
    return max(d for d in range(1, min(seq_len, preferred) + 1) if seq_len % d == 0)


def _split(a: jax.Array, n: int) -> jax.Array:
    """[B, S, ...] -> [n, B, S / n, ...]"""
    return a.reshape(a.shape[0], n, a.shape[1] // n, *a.shape[2:]).swapaxes(0, 1)


def _unsplit(a: jax.Array) -> jax.Array:
    """[n, B, S / n, ...] -> [B, S, ...]"""
    a = a.swapaxes(0, 1)
    return a.reshape(a.shape[0], a.shape[1] * a.shape[2], *a.shape[3:])


def _visible(segment_ids: jax.Array, key_segments: jax.Array, key_start: jax.Array) -> jax.Array:
    """[B, 1, 1, S, block]: query i sees key j when j <= i and both are in the same document."""
    s, block = segment_ids.shape[1], key_segments.shape[1]
    causal = jnp.arange(s)[:, None] >= key_start + jnp.arange(block)[None, :]
    same = segment_ids[:, :, None] == key_segments[:, None, :]
    return (causal & same)[:, None, None]


def _scores(q, k_block, visible):
    """q [B, KV, G, S, D] (scaled), k_block [B, block, KV, D] -> float32 scores [B, KV, G, S, block], -inf where
    hidden."""
    s = jnp.einsum("bkgqd,bjkd->bkgqj", q, k_block, preferred_element_type=jnp.float32)
    return jnp.where(visible, s, -jnp.inf)


def _forward(q, k, v, segment_ids, block):
    n = k.shape[1] // block
    b, kv, g, s, d = q.shape
    keys = (_split(k, n), _split(v, n), _split(segment_ids, n), jnp.arange(n) * block)

    def step(carry, key):
        m, denom, acc = carry
        k_j, v_j, seg_j, start = key
        visible = _visible(segment_ids, seg_j, start)
        scores = _scores(q, k_j, visible)
        m_new = jnp.maximum(m, scores.max(-1))
        # Rows with nothing visible yet keep m = -inf; their probabilities are zero, not exp(nan).
        safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.where(visible, jnp.exp(scores - safe[..., None]), 0.0)
        rescale = jnp.where(jnp.isfinite(m), jnp.exp(m - safe), 0.0)
        denom = denom * rescale + p.sum(-1)
        acc = acc * rescale[..., None] + jnp.einsum(
            "bkgqj,bjkd->bkgqd", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32
        )
        return (m_new, denom, acc), None

    init = (
        jnp.full((b, kv, g, s), -jnp.inf, jnp.float32),
        jnp.zeros((b, kv, g, s), jnp.float32),
        jnp.zeros((b, kv, g, s, d), jnp.float32),
    )
    (m, denom, acc), _ = jax.lax.scan(step, init, keys)
    # Every query sees itself, so denom > 0 and m is finite.
    return (acc / denom[..., None]).astype(q.dtype), m + jnp.log(denom)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segment_ids, block):
    return _forward(q, k, v, segment_ids, block)[0]


def _attention_fwd(q, k, v, segment_ids, block):
    out, lse = _forward(q, k, v, segment_ids, block)
    return out, (q, k, v, segment_ids, out, lse)


def _attention_bwd(block, residuals, d_out):
    q, k, v, segment_ids, out, lse = residuals
    n = k.shape[1] // block
    # delta_i = sum_d dO_id O_id: the softmax Jacobian's row term.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)

    def step(d_q, key):
        k_j, v_j, seg_j, start = key
        visible = _visible(segment_ids, seg_j, start)
        p = jnp.where(visible, jnp.exp(_scores(q, k_j, visible) - lse[..., None]), 0.0)
        d_v = jnp.einsum("bkgqj,bkgqd->bjkd", p.astype(d_out.dtype), d_out, preferred_element_type=jnp.float32)
        d_p = jnp.einsum("bkgqd,bjkd->bkgqj", d_out, v_j, preferred_element_type=jnp.float32)
        d_s = p * (d_p - delta[..., None])
        d_q = d_q + jnp.einsum("bkgqj,bjkd->bkgqd", d_s.astype(k_j.dtype), k_j, preferred_element_type=jnp.float32)
        d_k = jnp.einsum("bkgqj,bkgqd->bjkd", d_s.astype(q.dtype), q, preferred_element_type=jnp.float32)
        return d_q, (d_k.astype(k.dtype), d_v.astype(v.dtype))

    keys = (_split(k, n), _split(v, n), _split(segment_ids, n), jnp.arange(n) * block)
    d_q, (d_k, d_v) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32), keys)
    return d_q.astype(q.dtype), _unsplit(d_k), _unsplit(d_v), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, block: int = 512) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v, causal within each document: q [B, S, H, D], k and v [B, S, KV, D] with H a
    multiple of KV (grouped queries), segment_ids [B, S] -> [B, S, H, D]. `block` keys at a time (a divisor of S
    is used)."""
    b, s, h, d = q.shape
    kv = k.shape[2]
    grouped = (q * jnp.asarray(1 / math.sqrt(d), q.dtype)).reshape(b, s, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
    out = _attention(grouped, k, v, segment_ids, block_size(s, block))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)
