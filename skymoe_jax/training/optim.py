"""AdamW with learning-rate schedules, global-norm clipping, a weight-decay mask
and an optional learning-rate multiplier for expert parameters."""

from __future__ import annotations

import jax
import ml_collections
import optax
from flax import nnx


def schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup, then cosine to lr * min_lr_ratio, warmup-stable-decay (linear), or constant."""
    o, steps = config.optim, config.train.steps
    peak, floor, warmup = o.lr, o.lr * o.min_lr_ratio, o.warmup_steps
    warm = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
    if o.schedule == "constant":
        return optax.join_schedules([warm, optax.constant_schedule(peak)], [warmup])
    if o.schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, max(steps - warmup, 1), alpha=o.min_lr_ratio)
        return optax.join_schedules([warm, main], [warmup])
    decay = max(1, round(steps * o.decay_fraction))
    stable = max(0, steps - warmup - decay)
    return optax.join_schedules(
        [warm, optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)], [warmup, warmup + stable]
    )


def decay_mask(params: nnx.State, decay_embeddings: bool) -> nnx.State:
    """Decay weight matrices (those with an `embed` axis and another); never norm scales, biases or the
    router; the embedding and head only if asked."""

    def wants_decay(v):
        axes = v.axes
        if "embed" not in axes or len([a for a in axes if a != "layers"]) < 2 or None in axes:
            return False
        return decay_embeddings or "vocab" not in axes

    return jax.tree.map(wants_decay, params, is_leaf=lambda v: isinstance(v, nnx.Variable))


def expert_mask(params: nnx.State) -> nnx.State:
    return jax.tree.map(lambda v: "expert" in v.axes, params, is_leaf=lambda v: isinstance(v, nnx.Variable))


def make_optimizer(config: ml_collections.ConfigDict, params: nnx.State) -> optax.GradientTransformation:
    o = config.optim
    parts = []
    if o.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(o.grad_clip))
    parts.append(
        optax.adamw(
            schedule(config),
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            weight_decay=o.weight_decay,
            mask=decay_mask(params, o.decay_embeddings),
        )
    )
    if o.expert_lr_multiplier != 1.0:
        # Scaling the whole update scales the expert learning rate (and its decoupled weight decay) alike.
        parts.append(optax.masked(optax.scale(o.expert_lr_multiplier), expert_mask(params)))
    return optax.chain(*parts)
