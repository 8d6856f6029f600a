"""TrainState: everything a step reads and writes, including the adaptive aux coefficients and the experts'
selection bias of loss-free balancing."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct

from skymoe_jax.model.mesh_layout import MeshLayout
from skymoe_jax.model.spec import ModelSpec
from skymoe_jax.model.transformer import build_model
from skymoe_jax.training import aux_coef, balance_bias, optim


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of optimizer updates applied
    params: nnx.State
    opt_state: optax.OptState
    alpha: jax.Array | None  # [num MoE layers] float32 aux-loss coefficients, updated inside the step
    # [num MoE layers, E] float32 selection bias (moe.balance with bias), updated inside the step; None otherwise.
    # State, not a parameter: no gradient, weight decay or optimizer state reaches it.
    bias: jax.Array | None = None

    @classmethod
    def fresh(
        cls, params: nnx.State, tx: optax.GradientTransformation, config: ml_collections.ConfigDict
    ) -> TrainState:
        """Step 0 around params (random, upcycled, imported or another run's): a new optimizer state and the
        initial aux coefficients and selection bias."""
        moe_layers = ModelSpec.from_config(config).num_moe_layers
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            alpha=aux_coef.initial_alpha(config, moe_layers),
            bias=balance_bias.initial_bias(config, moe_layers),
        )


def create(
    config: ml_collections.ConfigDict,
) -> tuple[nnx.GraphDef, Callable[[], TrainState], optax.GradientTransformation]:
    """(graphdef, init, optimizer). init() makes a fresh state from config.seed; jit it with
    out_shardings so parameters never exist whole on one device (see training/runtime.py)."""
    spec, mesh_layout = ModelSpec.from_config(config), MeshLayout.from_config(config)
    abstract = nnx.eval_shape(lambda: build_model(spec, config.seed, mesh_layout))
    graphdef, abstract_params = nnx.split(abstract)
    tx = optim.make_optimizer(config, abstract_params)

    def init() -> TrainState:
        return TrainState.fresh(nnx.state(build_model(spec, config.seed, mesh_layout)), tx, config)

    return graphdef, init, tx
