"""Expert similarity (Skywork-MoE, section 2): how alike the experts of each MoE layer are.

Definition: flatten expert e's weights (W_gate, W_up and W_down, concatenated) into one
vector w_e. A layer with n experts has

    similarity = mean over the n(n-1) ordered pairs e != f of cos(w_e, w_f),

1.0 when all experts are identical (a fresh copy-upcycle), about 0 for independent
random initialisations. An all-zero expert counts as cosine 0 with every other.

It is computed on the devices from the sharded parameters, without gathering experts
or forming the n x n Gram matrix: with u_e = w_e / |w_e|,

    sum_{e != f} u_e . u_f = |sum_e u_e|^2 - sum_e |u_e|^2,

so a layer needs each expert's norm (a local reduction) and one sum over experts,
which is the size of a single expert. Layers go one at a time (lax.map), so the
temporaries are those of one layer, even for the 146B model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from skymoe_jax.model.spec import ModelSpec


def layer_similarity(weights: Sequence[jax.Array]) -> jax.Array:
    """Mean pairwise cosine similarity of one layer's experts; each tensor is [E, ...] (one per weight matrix)."""
    weights = [w.astype(jnp.float32) for w in weights]
    n = weights[0].shape[0]
    sq_norms = sum(jnp.sum(jnp.square(w), axis=tuple(range(1, w.ndim))) for w in weights)
    inv = jnp.where(sq_norms > 0, jax.lax.rsqrt(jnp.where(sq_norms > 0, sq_norms, 1.0)), 0.0)
    # The squared norm of sum_e u_e is the sum over the concatenated vector, i.e. over each weight matrix.
    sum_sq = sum(jnp.sum(jnp.square(jnp.sum(w * inv.reshape(-1, *(1,) * (w.ndim - 1)), axis=0))) for w in weights)
    diagonal = jnp.sum(sq_norms * jnp.square(inv))
    return (sum_sq - diagonal) / (n * (n - 1))


def expert_similarity(params: nnx.State, spec: ModelSpec) -> jax.Array:
    """[num MoE layers] similarity per MoE layer, in the order of the model's per-layer statistics."""
    modules = _expert_modules(params)
    per_stack, taken = [], 0
    for pattern, _ in spec.stacks():
        moe_in_block = sum(pattern)
        if not moe_in_block:
            continue
        # Each module's tensors are stacked over the stack's repeats; the model reports a stack's
        # layers repeat-major, then by position in the block, and so do we.
        sims = [jax.lax.map(layer_similarity, modules[taken + j]) for j in range(moe_in_block)]
        per_stack.append(jnp.stack(sims, axis=1).reshape(-1))
        taken += moe_in_block
    return jnp.concatenate(per_stack)


def _expert_modules(params: nnx.State) -> list[tuple[jax.Array, ...]]:
    """The stacked expert tensors [repeats, E, ...] of each expert module, in parameter-tree order."""
    modules: dict[tuple, list[jax.Array]] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda v: isinstance(v, nnx.Variable)):
        if isinstance(leaf, nnx.Variable) and "expert" in getattr(leaf, "axes", ()):
            modules.setdefault(path[:-1], []).append(leaf[...])
    return [tuple(tensors) for tensors in modules.values()]


def similarity_fn(spec: ModelSpec, mesh: Mesh) -> Callable[[nnx.State], jax.Array]:
    """expert_similarity jitted on the parameters where they lie; the result is replicated so every process
    (and the host of process 0) can read it."""
    return jax.jit(lambda params: expert_similarity(params, spec), out_shardings=NamedSharding(mesh, P()))
