"""Flash attention on the GPU (`model.attention_impl=pallas`): jax's Pallas Triton kernel
(jax.experimental.pallas.ops.gpu.attention.mha), causal, with segment ids for packed documents.

The kernel is jax's own (forward, and a Triton backward through its custom VJP); what this module adds
is how the model calls it. Grouped-query K and V are repeated to the query heads (the kernel takes
equal head counts), tiles are the largest power of two up to 128 that divides the sequence, and the
call runs per device under shard_map (per_device, which the CPU kernel shares). Off a GPU the kernel runs in
interpret mode (tests); `auto` never picks it until a GPU measurement says it is faster (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as flash
from jax.sharding import PartitionSpec as P

from skymoe_jax.kernels.common import resolve_interpret
from skymoe_jax.model.axes import batch_axes


def tile(seq_len: int, cap: int = 128) -> int:
    """The largest power of two <= cap dividing seq_len (config validation makes it at least 16, the
    smallest tile Triton's tl.dot takes)."""
    t = cap
    while seq_len % t:
        t //= 2
    return t


def pallas_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, layout: str, interpret: bool | None = None
) -> jax.Array:
    """Causal attention of q [B, S, H, D] over k, v [B, S, KV, D] within equal segment ids [B, S]."""
    s, h, d = q.shape[1], q.shape[2], q.shape[3]
    k, v = (jnp.repeat(a, h // a.shape[2], axis=2) for a in (k, v))
    fwd, bwd = tile(s), tile(s, cap=32)
    blocks = flash.BlockSizes(
        block_q=fwd, block_k=fwd, block_q_dkv=bwd, block_kv_dkv=bwd, block_q_dq=bwd, block_kv_dq=bwd
    )

    def local(q, k, v, segment_ids):
        return flash.mha(
            q,
            k,
            v,
            segment_ids,
            sm_scale=d**-0.5,
            causal=True,
            block_sizes=blocks,
            interpret=resolve_interpret(interpret),
        )

    return per_device(local, q, k, v, segment_ids, layout)


def per_device(
    local: Callable[..., jax.Array], q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, layout: str
) -> jax.Array:
    """local(q, k, v, segment_ids) run on each device's rows under shard_map (directly off a mesh): a kernel call
    has no SPMD partitioning rule, so without it XLA would gather the whole batch onto every device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, segment_ids)
    ep = mesh.shape["expert"]
    # EDP splits the heads over `expert` (tensor-parallel attention) where both head counts divide.
    split = layout == "edp" and ep > 1 and q.shape[2] % ep == 0 and k.shape[2] % ep == 0
    rows = batch_axes(layout)
    qkv = P(rows, None, "expert" if split else None, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, P(rows, None)), out_specs=qkv, check_vma=False)(
        q, k, v, segment_ids
    )
