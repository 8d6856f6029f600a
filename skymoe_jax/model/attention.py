"""Grouped-query self-attention with rotary embeddings and document (segment) masking."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from skymoe_jax.model.layers import param, rotary
from skymoe_jax.model.spec import ModelSpec


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, S, S] causal mask that also keeps packed documents from seeing each other."""
    s = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((s, s), bool))
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal & same_doc)[:, None]


class Attention(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        d, h, kv, hd = spec.d_model, spec.num_heads, spec.num_kv_heads, spec.head_dim
        std, dt = spec.init_std, spec.weight_dtype
        self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std, dt)
        self.wk = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), std, dt)
        self.wv = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), std, dt)
        self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), std, dt)
        if spec.qkv_bias:
            self.bq = nnx.Param(jnp.zeros((h, hd), dt), axes=("heads", "head_dim"))
            self.bk = nnx.Param(jnp.zeros((kv, hd), dt), axes=("kv_heads", "head_dim"))
            self.bv = nnx.Param(jnp.zeros((kv, hd), dt), axes=("kv_heads", "head_dim"))
        self.qkv_bias = spec.qkv_bias
        self.theta = spec.rope_theta
        self.dtype = spec.compute_dtype

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        dt = self.dtype
        q = jnp.einsum("bsd,dhk->bshk", x, self.wq[...].astype(dt))
        k = jnp.einsum("bsd,dhk->bshk", x, self.wk[...].astype(dt))
        v = jnp.einsum("bsd,dhk->bshk", x, self.wv[...].astype(dt))
        if self.qkv_bias:
            q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
        q, k = rotary(q, positions, self.theta), rotary(k, positions, self.theta)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask)
        return jnp.einsum("bshk,hkd->bsd", out, self.wo[...].astype(dt))
