"""Where a fresh run's state comes from: random init, an upcycled dense checkpoint
(init.upcycle_from), or the parameters of another checkpoint (init.from_checkpoint,
e.g. an imported Hugging Face model) with a fresh optimizer."""

from __future__ import annotations

import jax
import ml_collections

from skymoe_jax.checkpoint.manager import Checkpointer, saved_config, split_checkpoint_path
from skymoe_jax.checkpoint.upcycle import upcycled_state
from skymoe_jax.config import shape_changes
from skymoe_jax.errors import CheckpointError
from skymoe_jax.training.state import TrainState


def initial_state(config: ml_collections.ConfigDict, runtime) -> tuple[TrainState, str]:
    """(state, a few words on where it came from) for step 0, on the runtime's mesh."""
    init = config.init
    if init.upcycle_from:
        return upcycled_state(config, runtime), f"upcycled ({init.upcycle_mode}) from {init.upcycle_from}"
    if init.from_checkpoint:
        return params_from(init.from_checkpoint, config, runtime), f"parameters from {init.from_checkpoint}"
    return runtime.init(), "random init"


def params_from(path: str, config: ml_collections.ConfigDict, runtime) -> TrainState:
    """A fresh state around the parameters saved at path (a workdir's latest, or WORKDIR/checkpoints/STEP)."""
    workdir, step = split_checkpoint_path(path)
    source_config = saved_config(workdir, step)
    changed = shape_changes(source_config, config)
    if changed:
        raise CheckpointError(f"init.from_checkpoint={path} holds another model shape ({changed})")
    source = Checkpointer(workdir)
    step = source.latest_step() if step is None else step
    params = source.restore_params(step, runtime.abstract_state().params, runtime.shardings.params)
    source.close()
    return jax.jit(lambda p: TrainState.fresh(p, runtime.tx, config), out_shardings=runtime.shardings)(params)
