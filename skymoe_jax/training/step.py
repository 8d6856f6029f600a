"""Loss, train step and eval step: pure functions of pytrees, jitted by the loop.

One train step: forward -> CE + sum_l alpha_l * aux_l (+ z-loss) -> grads ->
optax update -> new alpha_l from this step's drop rates (and, with loss-free balancing, the new selection
bias from this step's expert counts), all in one jit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from skymoe_jax.kernels import common
from skymoe_jax.model import pipeline
from skymoe_jax.model.loss import cross_entropy
from skymoe_jax.model.mesh_layout import pipeline_stage_layers
from skymoe_jax.model.moe import router
from skymoe_jax.training import aux_coef, balance_bias
from skymoe_jax.training.optim import schedule
from skymoe_jax.training.state import TrainState

Batch = dict[str, jax.Array]  # inputs, targets, positions, segment_ids [B, S] int32; loss_mask [B, S] float32

# Per-MoE-layer statistics copied into the metrics, under these names.
LAYER_METRICS = {
    "drop_rate": "drop_rate",
    "aux_loss": "layer_aux_loss",
    "z_loss": "layer_z_loss",
    "max1_max2": "max1_max2",
    "max2_max3": "max2_max3",
    "router_entropy": "router_entropy",
    "expert_load": "expert_load",
    "max_vio": "max_vio",
    "seq_max_vio": "seq_max_vio",
    "seq_max_vio_shuffled": "seq_max_vio_shuffled",
}


class LossSettings(NamedTuple):
    aux_form: str  # moe.aux_loss
    aux_scope: str  # moe.aux_scope
    z_loss_coef: float
    microbatches: int  # parallel.num_microbatches (pipelined models)
    stage_remat: tuple[str, ...]  # per pipeline stage
    aux: bool = True  # moe.balance adds the aux loss

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> LossSettings:
        stages = len(pipeline_stage_layers(config)) // config.parallel.pipeline_repeats
        remat = tuple(config.parallel.stage_remat) or (config.model.remat,) * stages
        e = config.moe
        aux = balance_bias.uses_aux(e.balance)
        return cls(e.aux_loss, e.aux_scope, float(e.z_loss_coef), config.parallel.num_microbatches, remat, aux)


def forward(
    params: nnx.State,
    graphdef: nnx.GraphDef,
    batch: Batch,
    settings: LossSettings,
    *,
    train: bool,
    bias: jax.Array | None = None,
):
    """(sum of token cross-entropies, counted tokens, per-MoE-layer token means), pipelined when the model is.
    bias: TrainState.bias, the experts' selection bias per MoE layer (None without loss-free balancing)."""
    model = nnx.merge(graphdef, params)
    if model.mesh_layout.pipelined:
        return pipeline.forward(
            model, batch, train=train, microbatches=settings.microbatches, stage_remat=settings.stage_remat, bias=bias
        )
    out = model(batch["inputs"], batch["positions"], batch["segment_ids"], train=train, bias=bias)
    return (*cross_entropy(out.logits, batch), out.moe)


def loss_fn(
    params: nnx.State,
    graphdef: nnx.GraphDef,
    batch: Batch,
    alpha: jax.Array,
    settings: LossSettings,
    *,
    train: bool,
    bias: jax.Array | None = None,
):
    """CE + sum_l alpha_l * aux_l (+ z-loss); aux_l from the layer's batch means, so microbatching does not
    change it, or (moe.aux_scope=sequence) the layer's mean of its per-sequence losses, a mean over rows that
    microbatches split without changing it either. Without the aux loss (moe.balance=bias) the per-layer aux_l are
    still computed, as a balance measure, and weigh nothing."""
    ce_sum, count, moe = forward(params, graphdef, batch, settings, train=train, bias=bias)
    ce = ce_sum / jnp.maximum(count, 1.0)
    if not moe:
        return ce, (ce, jnp.float32(0), jnp.float32(0), moe)
    if settings.aux_scope == "sequence":
        layer_aux = moe["seq_aux_loss"]
    else:
        layer_aux = router.aux_loss_from_means(moe["mean_probs"], moe["expert_load"], settings.aux_form)
    moe = {**moe, "aux_loss": layer_aux, "max_vio": router.max_violation(moe["expert_load"])}
    aux = jnp.sum(alpha * moe["aux_loss"]) if settings.aux else jnp.float32(0)
    z = settings.z_loss_coef * jnp.sum(moe["z_loss"])
    return ce + aux + z, (ce, aux, z, moe)


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, config: ml_collections.ConfigDict, grad_shardings=None
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """grad_shardings (ZeRO-1 / FSDP): constrain gradients to the optimizer-state sharding."""
    lr_schedule = schedule(config)
    a = config.aux_coef
    settings = LossSettings.from_config(config)
    bias_rate = config.moe.bias_update_rate

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (ce, aux, z, moe)), grads = grad_fn(
            state.params, graphdef, batch, state.alpha, settings, train=True, bias=state.bias
        )
        if grad_shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        grad_norm = optax.tree.norm(grads)

        def update(params, opt_state, alpha, bias):
            updates, opt_state = tx.update(grads, opt_state, params)
            alpha = (
                aux_coef.update_alpha(alpha, moe["drop_rate"], mode=a.mode, xi=a.xi, beta=a.beta, alpha_max=a.alpha_max)
                if moe
                else alpha
            )
            if bias is not None:
                bias = balance_bias.update_bias(bias, moe["expert_counts"], bias_rate)
            return optax.apply_updates(params, updates), opt_state, alpha, bias

        # A non-finite loss or gradient never reaches the state: the step's update is dropped (the loop then stops
        # or counts the skip, per train.nonfinite). Kept apart as the compiled numbers showed (the default config;
        # a pipelined one): on the CPU a select between new and old state reads the old Adam moments after the
        # update has written them in place, so XLA kept copies of them (4.6 MiB of the default config's 104) and a
        # cond does not; XLA:GPU copies the parameters and both moments into a cond's branches (4.1 times the
        # layers' parameter bytes of temporaries against 1.9 with the select).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        old = (state.params, state.opt_state, state.alpha, state.bias)
        if common.platform() == "cpu":
            params, opt_state, alpha, bias = jax.lax.cond(finite, update, lambda *old: old, *old)
        else:
            params, opt_state, alpha, bias = jax.tree.map(lambda n, o: jnp.where(finite, n, o), update(*old), old)
        metrics = {
            "loss": loss,
            "ce_loss": ce,
            "aux_loss": aux,
            "z_loss": z,
            "lr": lr_schedule(state.step),
            "grad_norm": grad_norm,
            "alpha": alpha,
            "finite": finite,
        }
        metrics.update({name: moe[key] for key, name in LAYER_METRICS.items() if key in moe})
        if bias is not None:
            metrics["expert_bias"] = bias
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, alpha=alpha, bias=bias)
        return new, metrics

    return train_step


def make_eval_step(
    graphdef: nnx.GraphDef, config: ml_collections.ConfigDict
) -> Callable[[nnx.State, Batch, jax.Array | None], dict]:
    """Token-summed CE (so several batches average per token) and eval-capacity drop rates; the experts are
    chosen with the run's selection bias (TrainState.bias) as in training."""
    settings = LossSettings.from_config(config)

    def eval_step(params: nnx.State, batch: Batch, bias: jax.Array | None) -> dict:
        ce_sum, count, moe = forward(params, graphdef, batch, settings, train=False, bias=bias)
        result = {"ce_sum": ce_sum, "tokens": count}
        if moe:
            result["drop_rate"] = moe["drop_rate"]
        return result

    return eval_step
