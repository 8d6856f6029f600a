"""Upcycling a dense checkpoint of this trainer into an MoE train state.

Attention, norms, embeddings and head are copied; each MoE layer's experts start
from that layer's dense FFN; the router is freshly initialised; optimizer state,
step and aux coefficients start fresh. Two modes:

- copy: every expert is a copy of the dense FFN (optionally with Gaussian noise of
  `init.upcycle_noise` times each tensor's std). With renormalized top-k weights
  and no drops the MoE computes exactly the dense function at step 0.
- fine_grained: the dense FFN width F is cut into G = F / moe.expert_ffn_dim slices;
  expert e is slice e mod G. The router starts at zero, so every token's gate is
  uniform and top-k (ties go to the lowest index) picks experts 0..k-1 = every slice
  once when top_k == G; their down projections are scaled by 1 / combine weight
  (k with renormalization, n without), so the sum of slices is again the dense FFN.

The dense tensors are restored with target shardings (each process reads only the
slices its devices hold) and turned into the MoE state inside one jit whose
outputs carry the MoE shardings: no host ever holds the whole model.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from skymoe_jax.checkpoint.manager import (
    Checkpointer,
    checkpoint_dir,
    saved_config,
    split_checkpoint_path,
    tree_path_name,
)
from skymoe_jax.errors import CheckpointError, ConfigError
from skymoe_jax.model.mesh_layout import MeshLayout
from skymoe_jax.model.spec import ModelSpec
from skymoe_jax.model.transformer import OUTSIDE_LAYERS, at_path, build_model, layer_path, path_name, put_path
from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax.training.state import TrainState


def slices(config: ml_collections.ConfigDict, dense_ffn: int) -> int:
    """G: dense FFN slices per expert set (1 for copy mode); validates the MoE config against the dense width."""
    e = config.moe
    if config.init.upcycle_mode == "copy":
        if e.expert_ffn_dim != dense_ffn:
            raise ConfigError(
                f"copy upcycling needs moe.expert_ffn_dim equal to the dense FFN width {dense_ffn} "
                f"(got {e.expert_ffn_dim}); or use --config.init.upcycle_mode=fine_grained"
            )
        return 1
    if dense_ffn % e.expert_ffn_dim:
        raise ConfigError(
            f"fine-grained upcycling needs moe.expert_ffn_dim={e.expert_ffn_dim} to divide the dense "
            f"FFN width {dense_ffn}"
        )
    g = dense_ffn // e.expert_ffn_dim
    if e.top_k != g or e.num_experts % g:
        raise ConfigError(
            f"fine-grained upcycling into {g} slices keeps the dense function only with "
            f"moe.top_k={g} and moe.num_experts a multiple of {g} (got top_k={e.top_k}, "
            f"num_experts={e.num_experts})"
        )
    return g


def _dense_counterpart(config: ml_collections.ConfigDict, dense_ffn: int) -> ml_collections.ConfigDict:
    dense = config.copy_and_resolve_references()
    dense.moe.num_experts = 0
    dense.model.ffn_dim = dense_ffn
    return dense


def _paths(tree) -> dict[str, nnx.Variable]:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda v: isinstance(v, nnx.Variable))
    return {tree_path_name(path): leaf for path, leaf in leaves}


def load_dense(
    dense_dir: str, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> tuple[nnx.State, int, tuple[tuple[int, int, int], ...]]:
    """The dense checkpoint's parameters (a workdir's latest, or WORKDIR/checkpoints/STEP), restored onto
    `mesh` in the layer layout they were saved in, G (see `slices`) and where each layer is in that layout
    (MeshLayout.layer_places)."""
    dense_dir, step = split_checkpoint_path(dense_dir)
    dense_config = saved_config(dense_dir, step)
    if dense_config.moe.num_experts:
        raise CheckpointError(
            f"{dense_dir} holds an MoE checkpoint ({dense_config.moe.num_experts} experts); "
            "upcycling starts from a dense one (moe.num_experts=0)"
        )
    if dense_config.model.num_layers != config.model.num_layers:
        raise ConfigError(
            f"the dense checkpoint in {dense_dir} has model.num_layers="
            f"{dense_config.model.num_layers} but the MoE config has {config.model.num_layers}; "
            "upcycling keeps the depth"
        )
    source = Checkpointer(dense_dir)
    step = source.latest_step() if step is None else step
    directory = source.path(step)
    shapes = {
        name[len("params/") :]: shape for name, shape in source.saved_shapes(step).items() if name.startswith("params/")
    }
    ffn_key = path_name((*layer_path(0, 0), "ffn", "w_up"))  # a dense model is one stack of one-layer blocks
    if ffn_key not in shapes:
        raise CheckpointError(f"{directory} has no dense FFN ({ffn_key}); is it a checkpoint of this trainer?")
    g = slices(config, shapes[ffn_key][-1])
    # The dense run stored its layers by its own pipeline split, which need not be the MoE's.
    spec = ModelSpec.from_config(_dense_counterpart(config, shapes[ffn_key][-1]))
    dense_layout = MeshLayout(stage_layers=MeshLayout.from_config(dense_config).stage_layers)
    if (
        any(not is_moe for is_moe in ModelSpec.from_config(config).moe_layers)
        and config.model.ffn_dim != shapes[ffn_key][-1]
    ):
        raise ConfigError(
            f"the MoE config's dense layers have model.ffn_dim={config.model.ffn_dim} but the dense "
            f"checkpoint's FFN width is {shapes[ffn_key][-1]}"
        )
    params = nnx.state(nnx.eval_shape(lambda: build_model(spec, mesh_layout=dense_layout)), nnx.Param)
    for name, leaf in _paths(params).items():
        if name not in shapes:
            raise CheckpointError(f"dense checkpoint {directory} has no parameter {name}, which the MoE config needs")
        if shapes[name] != tuple(leaf.shape):
            raise CheckpointError(
                f"dense parameter {name} has shape {shapes[name]} in {directory} but the MoE "
                f"config needs {tuple(leaf.shape)}"
            )
    rules = mesh_lib.param_rules(config.parallel)
    if g > 1:
        rules = {**rules, "mlp": ("expert",)}  # each device reads only the slices its experts are made of
    restored = source.restore_params(step, params, mesh_lib.tree_shardings(params, mesh, rules))
    return restored, g, dense_layout.layer_places(spec)


def _zero_router_scale(spec: ModelSpec) -> float:
    """1 / the combine weight of each chosen expert under a zero router (every score ties)."""
    if spec.renormalize:
        return float(spec.top_k)
    return 2.0 if spec.score == "sigmoid" else float(spec.num_experts)


def upcycle_fn(
    config: ml_collections.ConfigDict, dense_places: tuple[tuple[int, int, int], ...], g: int, tx, shardings: TrainState
):
    """jit(dense params with their layers at `dense_places` -> fresh MoE TrainState) with the MoE state's
    shardings on its outputs."""
    spec, mesh_layout = ModelSpec.from_config(config), MeshLayout.from_config(config)
    n = spec.num_experts
    noise = config.init.upcycle_noise
    scale = (1.0 if g == 1 else _zero_router_scale(spec)) / spec.routed_scale

    def experts(ffn, key):
        r, d, width = ffn["w_gate"].shape
        f = width // g
        split_in = lambda w: jnp.tile(w.reshape(r, d, g, f).transpose(0, 2, 1, 3), (1, n // g, 1, 1))
        down = jnp.tile(ffn["w_down"].reshape(r, g, f, d), (1, n // g, 1, 1)) * scale
        out = {"w_gate": split_in(ffn["w_gate"]), "w_up": split_in(ffn["w_up"]), "w_down": down}
        if noise:
            keys = jax.random.split(key, 3)
            out = {
                name: w + noise * jnp.std(w) * jax.random.normal(kk, w.shape, w.dtype)
                for kk, (name, w) in zip(keys, sorted(out.items()))
            }
        return out

    def build(dense: nnx.State) -> TrainState:
        src = nnx.to_pure_dict(dense)
        layers = at_path(src, layer_path(0, 0))  # a dense model is one stack of one-layer blocks
        source = np.array([slot for _, _, slot in dense_places])
        places = mesh_layout.layer_places(spec)
        params = nnx.state(nnx.eval_shape(lambda: build_model(spec, mesh_layout=mesh_layout)), nnx.Param)
        stored = nnx.to_pure_dict(params)
        key = jax.random.key(config.seed)
        out = {name: src[name] for name in OUTSIDE_LAYERS}
        for s, (pattern, _) in enumerate(spec.stacks()):
            for p, is_moe in enumerate(pattern):
                ids = [i for i, (stack_of, position, _) in enumerate(places) if (stack_of, position) == (s, p)]
                layer = jax.tree.map(lambda a, ids=ids: a[source[ids]], layers)
                if is_moe:
                    key, k_router, k_noise = jax.random.split(key, 3)
                    router = (
                        jnp.zeros((len(ids), spec.d_model, n), jnp.float32)
                        if g > 1
                        else spec.router_init_std * jax.random.normal(k_router, (len(ids), spec.d_model, n))
                    )
                    layer["ffn"] = {"gate": router, "experts": experts(layer["ffn"], k_noise)}
                # Pipelined stacks are padded per stage: layers go to their slots, the padding stays zero
                # as in a fresh model.
                slots = np.array([places[i][2] for i in ids])
                padded = jax.tree.map(
                    lambda want, a, slots=slots: jnp.zeros(want.shape, a.dtype).at[slots].set(a),
                    at_path(stored, layer_path(s, p)),
                    layer,
                )
                put_path(out, layer_path(s, p), padded)
        nnx.replace_by_pure_dict(params, out)  # in place
        return TrainState.fresh(params, tx, config)

    return jax.jit(build, out_shardings=shardings)


def upcycled_state(config: ml_collections.ConfigDict, runtime) -> TrainState:
    """The MoE train state upcycled from config.init.upcycle_from, on the runtime's mesh."""
    dense, g, dense_places = load_dense(config.init.upcycle_from, config, runtime.mesh)
    return upcycle_fn(config, dense_places, g, runtime.tx, runtime.shardings)(dense)


def upcycle(config: ml_collections.ConfigDict, dense: str, out: str) -> str:
    """Write the MoE of `config` upcycled from `dense` (a dense workdir or WORKDIR/checkpoints/STEP) as
    step 0 of the new workdir `out`, with the config beside it; returns the checkpoint's path.
    `skymoe train --workdir=OUT` (or train(config, out)) then trains it like any run."""
    from skymoe_jax.config import apply_overrides
    from skymoe_jax.training import runtime as runtime_lib

    if os.path.isdir(checkpoint_dir(out)) and os.listdir(checkpoint_dir(out)):
        raise ConfigError(f"--out={out} already holds checkpoints; choose a new directory")
    config = apply_overrides(config, [f"--config.init.upcycle_from={dense}"])
    runtime = runtime_lib.build(config)
    with jax.set_mesh(runtime.mesh):
        state = upcycled_state(config, runtime)
        target = Checkpointer(out, create=True)
        target.save(0, state, config)
        target.close()
    return target.path(0)
