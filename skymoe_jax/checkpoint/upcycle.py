"""Upcycling a dense checkpoint of this trainer into an MoE train state.

Attention, norms, embeddings and head are copied; each MoE layer's FFNs are cut from that layer's dense FFN
of width F so that, with nothing dropped, the MoE computes the dense function at step 0 (a SwiGLU FFN is a
sum over its hidden units, so FFNs holding disjoint sets of them add up to the dense one):

- shared experts (moe.num_shared_experts, S hidden units in all) take the first S units; a sigmoid shared
  gate starts at zero, i.e. 0.5 for every token, and their down projection is doubled (both exact in floats).
- the routed experts split the other F - S units into g = (F - S) / moe.expert_ffn_dim slices: expert e holds
  slice e mod g, so experts v*g .. v*g + g-1 form virtual group v, one whole routed part. The router is
  Megatron's virtual-group initialisation: a random column per group, repeated for its g experts, so a token's
  logits tie within each group and top-k (k a multiple of g) picks whole groups: ties go to the lowest index,
  and a group's indices are consecutive, so even groups tied with each other are picked whole. A picked
  group's g experts get equal renormalized weights w_v and g sum_v w_v = 1, so the routed experts compute
  sum_v w_v (routed part) = (routed part) / g: their down projections are scaled by g. Without
  renormalization (fine_grained mode) the router starts at zero instead: every weight is 1/E, k/g groups are
  picked, and the scale is E g / k.
- copy mode is g = 1: every expert the whole routed part (optionally with Gaussian noise of
  `init.upcycle_noise` times each tensor's std), exact with renormalized top-k weights.

Optimizer state, step and aux coefficients start fresh. The dense tensors are restored with target shardings
(each process reads only the slices its devices hold) and turned into the MoE state inside one jit whose
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
    """g: the slices of the dense FFN's routed part per virtual group (1 for copy mode); validates the MoE config
    against the dense width."""
    e = config.moe
    shared = ModelSpec.from_config(config).shared_width
    if shared >= dense_ffn:
        raise ConfigError(
            f"the shared experts' {shared} hidden units (moe.num_shared_experts x moe.shared_expert_ffn_dim) "
            f"must be fewer than the dense FFN's {dense_ffn}, whose other units become the routed experts"
        )
    routed = dense_ffn - shared
    width = f"the dense FFN width {dense_ffn}" + (f" less the shared experts' {shared}, {routed}" if shared else "")
    if config.init.upcycle_mode == "copy":
        if e.expert_ffn_dim != routed:
            raise ConfigError(
                f"copy upcycling needs moe.expert_ffn_dim equal to {width} (got {e.expert_ffn_dim}); "
                "or use --config.init.upcycle_mode=fine_grained"
            )
        return 1
    if routed % e.expert_ffn_dim:
        raise ConfigError(f"fine-grained upcycling needs moe.expert_ffn_dim={e.expert_ffn_dim} to divide {width}")
    g = routed // e.expert_ffn_dim
    if e.top_k % g or e.num_experts % g:
        raise ConfigError(
            f"fine-grained upcycling into {g} slices keeps the dense function only when top-k picks whole "
            f"virtual groups of {g} experts: moe.top_k and moe.num_experts must be multiples of {g} (got "
            f"top_k={e.top_k}, num_experts={e.num_experts})"
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


def routed_experts(ffn: dict[str, jax.Array], shared: int, g: int, num_experts: int, scale: float) -> dict:
    """A dense FFN's weights (w_gate, w_up [R, d, F], w_down [R, F, d]) -> the routed experts' ([R, E, d, f],
    [R, E, f, d]): expert e is slice e mod g of the hidden units after the first `shared`, its down projection
    times `scale`."""
    r, d, width = ffn["w_gate"].shape
    f = (width - shared) // g
    copies = (1, num_experts // g, 1, 1)
    split_in = lambda w: jnp.tile(w[..., shared:].reshape(r, d, g, f).transpose(0, 2, 1, 3), copies)
    down = jnp.tile(ffn["w_down"][:, shared:].reshape(r, g, f, d), copies) * scale
    return {"w_gate": split_in(ffn["w_gate"]), "w_up": split_in(ffn["w_up"]), "w_down": down}


def shared_experts(ffn: dict[str, jax.Array], shared: int, scale: float) -> dict:
    """The shared experts' FFN: the dense FFN's first `shared` hidden units, the down projection times `scale`."""
    return {
        "w_gate": ffn["w_gate"][..., :shared],
        "w_up": ffn["w_up"][..., :shared],
        "w_down": ffn["w_down"][:, :shared] * scale,
    }


def virtual_group_router(key: jax.Array, shape: tuple[int, int, int], g: int, std: float) -> jax.Array:
    """Router weights [R, d, E] whose columns are equal within each virtual group of g consecutive experts, a
    normal(0, std) draw per group (Megatron's virtual-group initialisation; g = 1: every column its own)."""
    r, d, n = shape
    return jnp.repeat(std * jax.random.normal(key, (r, d, n // g)), g, axis=-1)


def upcycle_fn(
    config: ml_collections.ConfigDict, dense_places: tuple[tuple[int, int, int], ...], g: int, tx, shardings: TrainState
):
    """jit(dense params with their layers at `dense_places` -> fresh MoE TrainState) with the MoE state's
    shardings on its outputs."""
    spec, mesh_layout = ModelSpec.from_config(config), MeshLayout.from_config(config)
    n, k, shared = spec.num_experts, spec.top_k, spec.shared_width
    noise = config.init.upcycle_noise
    # Unnormalized weights sum to the picked experts' scores, which only a zero router makes the same for every
    # token (each 1/E under softmax, sigmoid(0) = 1/2 under sigmoid; k/g whole groups picked); copy mode keeps its
    # random router, inexact then. routed_scale multiplies every combine weight, so the experts divide by it.
    zero_router = config.init.upcycle_mode == "fine_grained" and not spec.renormalize
    weight = (0.5 if spec.score == "sigmoid" else 1.0 / n) if zero_router else 1.0
    scale = (g / (k * weight) if zero_router else float(g)) / spec.routed_scale
    gated = spec.shared_expert_gate == "sigmoid"

    def with_noise(out, key):
        keys = jax.random.split(key, 3)
        return {
            name: w + noise * jnp.std(w) * jax.random.normal(kk, w.shape, w.dtype)
            for kk, (name, w) in zip(keys, sorted(out.items()))
        }

    def moe_ffn(ffn, rows, k_router, k_noise):
        shape = (rows, spec.d_model, n)
        experts = routed_experts(ffn, shared, g, n, scale)
        out = {
            "gate": jnp.zeros(shape, jnp.float32)
            if zero_router
            else virtual_group_router(k_router, shape, g, spec.router_init_std),
            "experts": with_noise(experts, k_noise) if noise else experts,
        }
        if shared:
            # A zero gate is sigmoid(0) = 0.5 for every token, which the doubled down projection undoes.
            out["shared"] = shared_experts(ffn, shared, 2.0 if gated else 1.0)
            if gated:
                out["shared_gate"] = jnp.zeros((rows, spec.d_model, 1), ffn["w_gate"].dtype)
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
                    layer["ffn"] = moe_ffn(layer["ffn"], len(ids), k_router, k_noise)
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
