"""`load_model(path)`: a trained (or imported, or upcycled) model, ready to call."""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from skymoe_jax.checkpoint import storage
from skymoe_jax.checkpoint.manager import Checkpointer, saved_config, split_checkpoint_path
from skymoe_jax.errors import CheckpointError
from skymoe_jax.model.axes import AXES
from skymoe_jax.model.mesh_layout import MeshLayout
from skymoe_jax.model.spec import ModelSpec
from skymoe_jax.model.transformer import SelectionBias, Transformer, build_model
from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax.training import balance_bias


def load_model(path: str, device: jax.Device | None = None) -> tuple[Transformer, ml_collections.ConfigDict]:
    """(model, config) from a workdir (its latest checkpoint) or a checkpoint directory.

    `model(tokens)` with int32 tokens [batch, seq] returns an output with `.logits`
    [batch, seq, vocab] (and `.moe`, the per-layer routing statistics). Parameters are
    placed by the run's config on this machine's devices, or all on `device` whatever mesh
    the run had (a pipelined or expert-parallel run's too). Each sequence is one routing
    group with moe.eval_capacity_factor, so any batch shape works. A run with loss-free balancing
    (moe.balance=bias or aux+bias) routes with its saved selection bias (`model.selection_bias`).
    """
    workdir, step = split_checkpoint_path(path)
    if not storage.isdir(workdir):
        raise CheckpointError(f"{path}: no such directory; give a workdir or WORKDIR/checkpoints/STEP")
    config = saved_config(workdir, step)
    source = Checkpointer(workdir)
    step = source.latest_step() if step is None else step
    spec = ModelSpec.from_config(config)
    abstract = nnx.eval_shape(
        lambda: build_model(dataclasses.replace(spec, group_size=0), mesh_layout=MeshLayout.from_config(config))
    )
    graphdef, params = nnx.split(abstract, nnx.Param)
    if device is None:
        mesh = mesh_lib.make_mesh(config)
    else:
        mesh = Mesh(np.asarray([device]).reshape(1, 1, 1), AXES, axis_types=(AxisType.Auto,) * 3)
    restored = source.restore_params(
        step, params, mesh_lib.tree_shardings(params, mesh, mesh_lib.param_rules(config.parallel))
    )
    model = nnx.merge(graphdef, restored)
    bias = jax.eval_shape(lambda: balance_bias.initial_bias(config, spec.num_moe_layers))
    if bias is not None:  # loss-free balancing: the model routes with the run's bias, as its training did
        model.selection_bias = SelectionBias(source.restore_part(step, "bias", bias, NamedSharding(mesh, P())))
    source.close()
    return model, config


__all__ = ["load_model"]
