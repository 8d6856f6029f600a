"""Causal attention over packed documents in memory linear in the sequence length.

The keys are taken a block at a time with an online softmax (running maximum and sum per query),
so no [S, S] score matrix exists: the forward keeps [block, block] scores, and the backward recomputes
them block by block from the saved log-sum-exp (the FlashAttention recurrence) instead of keeping
the probabilities, so what a layer saves for the backward pass is q, k, v, the output and one
float per query and head. Plain JAX (no kernel), so it runs and shards wherever XLA does.

The queries are cut into blocks of the same size, and query block i runs over key blocks 0..i only:
the key blocks above the diagonal, which it cannot see, are never computed, so the scores cover
(n + 1) / 2n of the [S, S] square for n blocks (62.5% at 4 blocks, 53% at 16). Each query block is a
scan of its own, unrolled in Python (n of them forward and n backward); in the backward pass query
block i adds its keys' gradients into d_k and d_v, carried from one query block to the next. The
scans index the keys (a dynamic slice per step), so nothing is copied per query block and memory
stays linear in S.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from skymoe_jax.kernels import common

# Blocks of queries and keys. On the CPU a quarter of the sequence up to 256: at 1,024 tokens 256 took about
# half the time of 512 forward and backward (its scores stay in cache), and shorter sequences keep four query
# blocks so that skipping the diagonal's upper side pays (docs/BENCHMARKS.md, "Chunked attention skips the
# blocks above the diagonal"). Elsewhere 512 keeps the matmuls large; unmeasured on a GPU.
CPU_BLOCK = 256
DEFAULT_BLOCK = 512


def preferred_block(seq_len: int, platform: str | None = None) -> int:
    """The block chunked attention takes for a sequence on a platform (cpu, gpu, ...; default: the platform
    of the program being traced): a divisor of the sequence."""
    cpu = (platform or common.platform()) == "cpu"
    return block_size(seq_len, min(CPU_BLOCK, max(seq_len // 4, 1)) if cpu else DEFAULT_BLOCK)


def block_size(seq_len: int, preferred: int = DEFAULT_BLOCK) -> int:
    """The largest divisor of seq_len not above `preferred`: blocks must tile the sequence."""
    return max(d for d in range(1, min(seq_len, preferred) + 1) if seq_len % d == 0)


def _visible(q_segments: jax.Array, q_start: int, k_segments: jax.Array, k_start: jax.Array) -> jax.Array:
    """[B, 1, 1, Sq, block]: query q_start + i sees key k_start + j when it is not later and both are in the same
    document."""
    sq, block = q_segments.shape[1], k_segments.shape[1]
    causal = q_start + jnp.arange(sq)[:, None] >= k_start + jnp.arange(block)[None, :]
    same = q_segments[:, :, None] == k_segments[:, None, :]
    return (causal & same)[:, None, None]


def _scores(q, k_block, visible):
    """q [B, KV, G, Sq, D] (scaled), k_block [B, block, KV, D] -> float32 scores [B, KV, G, Sq, block], -inf where
    hidden."""
    s = jnp.einsum("bkgqd,bjkd->bkgqj", q, k_block, preferred_element_type=jnp.float32)
    return jnp.where(visible, s, -jnp.inf)


def _rows(a: jax.Array, start: jax.Array, block: int) -> jax.Array:
    """a[:, start : start + block] for a traced start (the scans index the keys; slicing each query block's
    prefix of keys up front would copy them, (n + 1) / 2 times over)."""
    return jax.lax.dynamic_slice_in_dim(a, start, block, axis=1)


def _key_block(k, v, segment_ids, q_segments, q_start, start, block):
    """Key block at `start` (traced) as query block `q_start` sees it: (k_j, v_j, visible)."""
    visible = _visible(q_segments, q_start, _rows(segment_ids, start, block), start)
    return _rows(k, start, block), _rows(v, start, block), visible


def _query_block(a, i, block):
    """Query block i of a [B, KV, G, S, ...] array."""
    return a[:, :, :, i * block : (i + 1) * block]


def _forward_block(q_i, q_start, k, v, segment_ids, block):
    """One query block against the key blocks up to and including its own (the later ones it cannot see):
    (out [B, KV, G, block, D] float32, log-sum-exp [B, KV, G, block])."""
    b, kv, g, sq, d = q_i.shape
    q_segments = segment_ids[:, q_start : q_start + sq]

    def step(carry, start):
        m, denom, acc = carry
        k_j, v_j, visible = _key_block(k, v, segment_ids, q_segments, q_start, start, block)
        scores = _scores(q_i, k_j, visible)
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
        jnp.full((b, kv, g, sq), -jnp.inf, jnp.float32),
        jnp.zeros((b, kv, g, sq), jnp.float32),
        jnp.zeros((b, kv, g, sq, d), jnp.float32),
    )
    (m, denom, acc), _ = jax.lax.scan(step, init, jnp.arange(q_start // block + 1) * block)
    # Every query sees itself, so denom > 0 and m is finite.
    return acc / denom[..., None], m + jnp.log(denom)


def _forward(q, k, v, segment_ids, block):
    blocks = [
        _forward_block(_query_block(q, i, block), i * block, k, v, segment_ids, block)
        for i in range(q.shape[3] // block)
    ]
    out = jnp.concatenate([o for o, _ in blocks], axis=3)
    return out.astype(q.dtype), jnp.concatenate([lse for _, lse in blocks], axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segment_ids, block):
    return _forward(q, k, v, segment_ids, block)[0]


def _attention_fwd(q, k, v, segment_ids, block):
    out, lse = _forward(q, k, v, segment_ids, block)
    return out, (q, k, v, segment_ids, out, lse)


def _backward_block(q_i, q_start, d_out_i, lse_i, delta_i, k, v, segment_ids, block, d_kv):
    """One query block's gradients: d_q [B, KV, G, block, D], and (d_k, d_v) [B, S, KV, D] float32 with its
    share added to the keys it sees. The key gradients are carried from block to block, so one pair of
    accumulators exists however many query blocks there are."""
    q_segments = segment_ids[:, q_start : q_start + q_i.shape[3]]

    def step(carry, start):
        d_q, (d_k, d_v) = carry
        k_j, v_j, visible = _key_block(k, v, segment_ids, q_segments, q_start, start, block)
        p = jnp.where(visible, jnp.exp(_scores(q_i, k_j, visible) - lse_i[..., None]), 0.0)
        d_v_j = jnp.einsum("bkgqj,bkgqd->bjkd", p.astype(d_out_i.dtype), d_out_i, preferred_element_type=jnp.float32)
        d_p = jnp.einsum("bkgqd,bjkd->bkgqj", d_out_i, v_j, preferred_element_type=jnp.float32)
        d_s = p * (d_p - delta_i[..., None])
        d_q = d_q + jnp.einsum("bkgqj,bjkd->bkgqd", d_s.astype(k_j.dtype), k_j, preferred_element_type=jnp.float32)
        d_k_j = jnp.einsum("bkgqj,bkgqd->bjkd", d_s.astype(q_i.dtype), q_i, preferred_element_type=jnp.float32)
        add = lambda acc, part: jax.lax.dynamic_update_slice_in_dim(acc, _rows(acc, start, block) + part, start, 1)
        return (d_q, (add(d_k, d_k_j), add(d_v, d_v_j))), None

    starts = jnp.arange(q_start // block + 1) * block
    (d_q, d_kv), _ = jax.lax.scan(step, (jnp.zeros(q_i.shape, jnp.float32), d_kv), starts)
    return d_q, d_kv


def _attention_bwd(block, residuals, d_out):
    q, k, v, segment_ids, out, lse = residuals
    # delta_i = sum_d dO_id O_id: the softmax Jacobian's row term.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)
    d_kv = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    d_q = []
    for i in range(q.shape[3] // block):
        part = functools.partial(_query_block, i=i, block=block)
        d_q_i, d_kv = _backward_block(
            part(q), i * block, part(d_out), part(lse), part(delta), k, v, segment_ids, block, d_kv
        )
        d_q.append(d_q_i)
    d_k, d_v = d_kv
    return jnp.concatenate(d_q, axis=3).astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def chunked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, block: int | None = None
) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v, causal within each document: q [B, S, H, D], k and v [B, S, KV, D] with H a
    multiple of KV (grouped queries), segment_ids [B, S] -> [B, S, H, D]. Queries and keys in blocks of `block`
    (a divisor of S is used; default: `preferred_block(S)`)."""
    b, s, h, d = q.shape
    kv = k.shape[2]
    grouped = (q * jnp.asarray(1 / math.sqrt(d), q.dtype)).reshape(b, s, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
    out = _attention(grouped, k, v, segment_ids, block_size(s, block) if block else preferred_block(s))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)
