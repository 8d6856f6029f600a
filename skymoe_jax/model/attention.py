"""Grouped-query self-attention with rotary embeddings and document (segment) masking.

`model.attention_impl` picks how: xla materializes [B, H, S, S] scores (jax.nn.dot_product_attention
with a [B, 1, S, S] mask), memory quadratic in the sequence; blocked (model/blocked_attention.py) cuts
the queries into blocks that skip the keys above the diagonal, still quadratic; chunked
(model/chunked_attention.py) takes queries and keys a block at a time, skips the blocks above the diagonal
and keeps memory linear; pallas (kernels/attention.py) is a Triton flash attention kernel for the GPU, linear
too; cpu (kernels/cpu_attention.py) is a compiled C++ kernel for the CPU, float32, linear as well. auto is cpu on
the CPU in float32 where the package's CPU kernels build (kernels/cpu_ffi.py); otherwise chunked from
CPU_CHUNKED_FROM tokens on the CPU (blocked below) and from CHUNKED_FROM elsewhere (xla below); it never picks
pallas until a GPU measurement does (none yet).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from skymoe_jax.errors import ConfigError
from skymoe_jax.kernels import common, cpu_attention, cpu_ffi
from skymoe_jax.kernels.attention import pallas_attention
from skymoe_jax.model.blocked_attention import blocked_attention
from skymoe_jax.model.chunked_attention import chunked_attention
from skymoe_jax.model.layers import RMSNorm, param, project, rotary
from skymoe_jax.model.spec import ModelSpec

# Measured in docs/BENCHMARKS.md ("Attention", CPU): at 1,024 tokens chunked was already faster and smaller; at
# 256 (one block) the two were within the machine's noise, so shorter sequences keep XLA's fused path. On the
# CPU, since chunked attention skips the blocks above the diagonal, it is also used from 512 tokens: there it
# was 0.94x blocked's step time alternating in one process and level against the PyTorch peer (within the
# noise), with 0.1 GiB less peak memory; at 256 blocked stays (chunked was slower against the peer).
CHUNKED_FROM = 1024
CPU_CHUNKED_FROM = 512


def resolve_attention_impl(impl: str, seq_len: int, platform: str | None = None, dtype: str = "float32") -> str:
    """model.attention_impl for a sequence length and compute dtype on a platform (cpu, gpu, ...; default: the
    platform of the program being traced, kernels/common.py): auto -> cpu on the CPU in float32 where the CPU
    kernels are available; otherwise chunked from CPU_CHUNKED_FROM tokens on the CPU, blocked below; elsewhere
    chunked from CHUNKED_FROM tokens, xla below."""
    if impl != "auto":
        return impl
    cpu = (platform or common.platform()) == "cpu"
    if cpu and jnp.dtype(dtype) == jnp.float32 and cpu_ffi.available():
        return "cpu"
    if seq_len >= (CPU_CHUNKED_FROM if cpu else CHUNKED_FROM):
        return "chunked"
    return "blocked" if cpu else "xla"


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, S, S] causal mask that also keeps packed documents from seeing each other."""
    s = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((s, s), bool))
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal & same_doc)[:, None]


class Attention(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs, layout: str):
        """layout: parallel.layout, which says how the Pallas kernel's shard_map splits heads and batch."""
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
        if spec.qk_norm == "head":  # Qwen3: each head's query and key
            self.q_norm = RMSNorm(spec, (hd,), ("head_dim",))
            self.k_norm = RMSNorm(spec, (hd,), ("head_dim",))
        elif spec.qk_norm == "full":  # OLMoE: all heads' queries together, and all keys
            self.q_norm = RMSNorm(spec, (h, hd), ("heads", "head_dim"))
            self.k_norm = RMSNorm(spec, (kv, hd), ("kv_heads", "head_dim"))
        self.qk_norm = spec.qk_norm
        self.theta = spec.rope_theta
        self.dtype = spec.compute_dtype
        self.impl = spec.attention_impl
        self.layout = layout

    def project(
        self, x: jax.Array, positions: jax.Array, length: int | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries [B, S, heads, head_dim], keys and values [B, S, kv_heads, head_dim] of x [B, S, d], rotated to
        their positions, which lie in [0, length) (default: [0, S); model/decode.py's cache is longer)."""
        dt = self.dtype
        q = project("bsd,dhk->bshk", x, self.wq[...].astype(dt))
        k = project("bsd,dhk->bshk", x, self.wk[...].astype(dt))
        v = project("bsd,dhk->bshk", x, self.wv[...].astype(dt))
        if self.qkv_bias:
            q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
        if self.qk_norm != "none":
            q, k = self.q_norm(q), self.k_norm(k)
        return rotary(q, positions, self.theta, length), rotary(k, positions, self.theta, length), v

    def output(self, out: jax.Array) -> jax.Array:
        """The heads' outputs [B, S, heads, head_dim] back to the model's width [B, S, d]."""
        return project("bshk,hkd->bsd", out, self.wo[...].astype(self.dtype))

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        dt = self.dtype
        q, k, v = self.project(x, positions)
        impl = resolve_attention_impl(self.impl, x.shape[1], dtype=dt)
        if impl == "cpu":
            if not cpu_ffi.usable(q, k, v):
                kernels = "built" if cpu_ffi.available() else "unavailable (the log says why)"
                raise ConfigError(
                    "model.attention_impl=cpu needs float32 on the CPU platform and the package's CPU kernels; here "
                    f"the platform is {common.platform()}, the dtype {q.dtype}, the kernels {kernels}: use "
                    "model.attention_impl=auto"
                )
            out = cpu_attention.cpu_attention(q, k, v, segment_ids, self.layout)
        elif impl == "chunked":
            out = chunked_attention(q, k, v, segment_ids)
        elif impl == "blocked":
            out = blocked_attention(q, k, v, segment_ids)
        elif impl == "pallas":
            out = pallas_attention(q, k, v, segment_ids, self.layout)
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=attention_mask(segment_ids))
        return self.output(out)
