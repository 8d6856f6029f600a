"""The decoder: embedding, layer stacks scanned over stacked parameters, final
norm and untied head. Returns logits and the per-MoE-layer statistics."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from skymoe_jax.model.attention import Attention
from skymoe_jax.model.layers import Embed, Head, RMSNorm, SwiGLU
from skymoe_jax.model.mesh_layout import MeshLayout
from skymoe_jax.model.moe.block import MoEBlock
from skymoe_jax.model.spec import ModelSpec

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, S, V] float32
    moe: dict[str, jax.Array]  # per MoE layer, in layer order: scalars -> [L_moe], expert_load -> [L_moe, E]


class SelectionBias(nnx.Variable):
    """Loss-free balancing's per-expert selection bias [MoE layers, E] held by a model restored from a run
    (checkpoint/load.py), not a parameter: training passes TrainState.bias to the forward pass instead."""


def layer_biases(layers, bias: jax.Array | None) -> list[jax.Array | None]:
    """Each of a block's layers' selection bias [E] from the block's [MoE layers of the block, E]: the MoE layers'
    rows in order, None for the dense ones (and for every layer without a bias)."""
    out, row = [], 0
    for layer in layers:
        out.append(bias[row] if layer.is_moe and bias is not None else None)
        row += layer.is_moe
    return out


class DecoderLayer(nnx.Module):
    def __init__(self, spec: ModelSpec, is_moe: bool, rngs: nnx.Rngs, layout: str):
        self.attn_norm = RMSNorm(spec)
        self.attn = Attention(spec, rngs, layout)
        self.ffn_norm = RMSNorm(spec)
        self.ffn = MoEBlock(spec, rngs, layout) if is_moe else SwiGLU(spec, spec.ffn_dim, rngs)
        self.is_moe = is_moe

    def __call__(self, x, positions, segment_ids, *, train: bool, bias: jax.Array | None = None):
        x = x + self.attn(self.attn_norm(x), positions, segment_ids)
        h = self.ffn_norm(x)
        if self.is_moe:
            y, stats = self.ffn(h, train=train, bias=bias)
            return x + y, stats
        return x + self.ffn(h), None


class SuperBlock(nnx.Module):
    """A fixed pattern of layers (e.g. dense, MoE); a stack scans over copies of it."""

    def __init__(self, spec: ModelSpec, pattern: tuple[bool, ...], rngs: nnx.Rngs, layout: str):
        self.layers = nnx.List([DecoderLayer(spec, is_moe, rngs, layout) for is_moe in pattern])

    def __call__(self, x, positions, segment_ids, *, train: bool, bias: jax.Array | None = None):
        """bias [MoE layers of the block, E] or None: each MoE layer's selection bias, in order."""
        stats = []
        for layer, row in zip(self.layers, layer_biases(self.layers, bias)):
            x, s = layer(x, positions, segment_ids, train=train, bias=row)
            if s is not None:
                stats.append(s)
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *stats) if stats else {}
        return x, stacked


def _stacked_axes(state: nnx.State) -> nnx.State:
    """Prefix the logical axes of vmapped (stacked) parameters with 'layers'."""
    return jax.tree.map(
        lambda v: v.replace(axes=("layers", *v.axes)) if isinstance(v, nnx.Param) else v,
        state,
        is_leaf=lambda v: isinstance(v, nnx.Variable),
    )


class Stack(nnx.Module):
    """`repeats` copies of a SuperBlock with parameters stacked on a leading 'layers' axis, applied by lax.scan
    (unrolled unless model.scan_layers)."""

    def __init__(
        self,
        spec: ModelSpec,
        pattern: tuple[bool, ...],
        repeats: int,
        rngs: nnx.Rngs,
        layout: str,
        stored: tuple[int, np.ndarray] | None = None,
    ):
        """stored=(length, slots): keep the blocks in a longer stack at these slots, zeros elsewhere (the
        pipelined layout); the blocks themselves are drawn exactly as without it."""
        keys = jax.random.split(rngs.params(), repeats)

        @nnx.vmap(in_axes=0, out_axes=0)
        def make(key):
            return SuperBlock(spec, pattern, nnx.Rngs(params=key), layout)

        blocks = make(keys)
        graphdef, state = nnx.split(blocks)
        if stored is not None:
            length, slots = stored
            state = jax.tree.map(lambda a: jnp.zeros((length, *a.shape[1:]), a.dtype).at[slots].set(a), state)
        self.blocks = nnx.merge(graphdef, _stacked_axes(state))
        self.remat = spec.remat
        self.scan = spec.scan_layers

    def __call__(
        self,
        x,
        positions,
        segment_ids,
        *,
        train: bool,
        slots: np.ndarray | None = None,
        bias: jax.Array | None = None,
    ):
        """Apply the stacked blocks in order; `slots` picks and orders stored blocks (pipelined layouts). bias
        [repeats, MoE layers per block, E] or None: the blocks' selection biases, in the order they run."""
        graphdef, state = nnx.split(self.blocks)
        if slots is not None:
            state = jax.tree.map(lambda a: a[slots], state)

        def body(carry, layer):
            layer_state, layer_bias = layer
            return nnx.merge(graphdef, layer_state)(carry, positions, segment_ids, train=train, bias=layer_bias)

        if self.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat])
        # Rematerialized layers run as a loop even when scan_layers=False: unrolled, nothing ties a layer's
        # recomputation to its place in the backward pass, and XLA's CPU scheduler ran all of them at once,
        # keeping every layer's activations live (353 -> 355 MiB of temporaries under `full` instead of 136
        # looped; docs/BENCHMARKS.md).
        return jax.lax.scan(body, x, (state, bias), unroll=not self.scan and self.remat == "none")


class Transformer(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs, mesh_layout: MeshLayout = MeshLayout()):
        self.spec = spec
        self.mesh_layout = mesh = mesh_layout
        self.embed = Embed(spec, rngs)
        # Pipelined: one stack (validated), stored stage by stage with each stage padded to the longest.
        n = spec.num_layers
        stored = (mesh.stored_layers(n), mesh.layer_slots(n)) if mesh.pipelined else None
        self.stacks = nnx.List(
            [Stack(spec, pattern, repeats, rngs, mesh.layout, stored) for pattern, repeats in spec.stacks()]
        )
        self.final_norm = RMSNorm(spec)
        self.head = Head(spec, rngs)
        self.selection_bias: SelectionBias | None = nnx.data(None)  # set by checkpoint/load.py for a bias run

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        train: bool = False,
        bias: jax.Array | None = None,
    ) -> ModelOutput:
        """tokens int32 [B, S]; positions and segment_ids [B, S] for packed documents (default: one document);
        bias [MoE layers, E] in layer order: the selection bias of loss-free balancing (default: the model's own
        selection_bias, if it has one)."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        x = self.embed(tokens)
        per_stack = []
        mesh = self.mesh_layout
        slots = mesh.layer_slots(self.spec.num_layers) if mesh.pipelined else None
        biases = self.stack_biases(bias)
        for stack, stack_bias in zip(self.stacks, biases):
            x, stats = stack(x, positions, segment_ids, train=train, slots=slots, bias=stack_bias)
            if stats:  # [repeats, moe layers per block, ...] -> [moe layers of the stack, ...]
                per_stack.append(jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), stats))
        moe = jax.tree.map(lambda *a: jnp.concatenate(a), *per_stack) if per_stack else {}
        return ModelOutput(self.head(self.final_norm(x)), moe)

    def stack_biases(self, bias: jax.Array | None) -> list[jax.Array | None]:
        """bias [MoE layers, E] in layer order (None: the model's selection_bias, if any) -> per stack [repeats,
        MoE layers per block, E] (None: no bias)."""
        if bias is None and self.selection_bias is not None:
            bias = self.selection_bias[...]
        if bias is None:
            return [None] * len(self.stacks)
        out, start = [], 0
        for pattern, repeats in self.spec.stacks():
            count = repeats * sum(pattern)
            out.append(bias[start : start + count].reshape(repeats, sum(pattern), -1) if count else None)
            start += count
        return out


def build_model(spec: ModelSpec, seed: int = 0, mesh_layout: MeshLayout = MeshLayout()) -> Transformer:
    return Transformer(spec, nnx.Rngs(params=seed), mesh_layout)


# Where a Transformer keeps its parameters, for code that reads or writes them as nested dicts
# (nnx.to_pure_dict): upcycling and the Hugging Face conversion. Each layer's place comes from
# MeshLayout.layer_places(spec) as (stack, position, stored index).
OUTSIDE_LAYERS = ("embed", "final_norm", "head")


def layer_path(stack: int, position: int) -> tuple[str | int, ...]:
    """The parameters of the layer at `position` in stack `stack`'s block, stacked over its stored layers."""
    return ("stacks", stack, "blocks", "layers", position)


def path_name(path: tuple[str | int, ...]) -> str:
    """A path as checkpoints name it: 'stacks/0/blocks/layers/0/ffn/w_up'."""
    return "/".join(str(part) for part in path)


def at_path(tree: dict, path: tuple[str | int, ...]):
    for part in path:
        tree = tree[part]
    return tree


def put_path(tree: dict, path: tuple[str | int, ...], value) -> None:
    """Set tree[path] = value, making the dicts on the way."""
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value
