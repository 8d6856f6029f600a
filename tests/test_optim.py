"""Learning-rate schedules against their formulas; weight-decay and expert-LR masks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from skymoe_jax.config import base_config
from skymoe_jax.model.spec import ModelSpec
from skymoe_jax.model.transformer import build_model
from skymoe_jax.training import optim


def _config(**optim_fields):
    c = base_config()
    c.train.steps = 100
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10
    c.optim.min_lr_ratio = 0.1
    c.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, ffn_dim=64)
    c.moe.expert_ffn_dim = 32
    for k, v in optim_fields.items():
        c.optim[k] = v
    return c


def test_cosine_schedule_formula():
    sched = optim.schedule(_config(schedule="cosine"))
    for step in [0, 5, 10, 40, 99, 100]:
        if step < 10:
            want = 1e-3 * step / 10
        else:
            frac = (step - 10) / 90
            want = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        assert math.isclose(float(sched(step)), want, rel_tol=1e-5, abs_tol=1e-12), step


def test_wsd_schedule_formula():
    sched = optim.schedule(_config(schedule="wsd", decay_fraction=0.2))
    # warmup 0-10, stable 10-80, linear decay 80-100 to lr * min_lr_ratio
    assert math.isclose(float(sched(5)), 5e-4, rel_tol=1e-5)
    assert math.isclose(float(sched(50)), 1e-3, rel_tol=1e-5)
    assert math.isclose(float(sched(90)), 1e-3 - 0.5 * 0.9e-3, rel_tol=1e-5)
    assert math.isclose(float(sched(100)), 1e-4, rel_tol=1e-5)


def test_constant_schedule_with_warmup():
    sched = optim.schedule(_config(schedule="constant"))
    assert math.isclose(float(sched(5)), 5e-4, rel_tol=1e-5)
    assert math.isclose(float(sched(60)), 1e-3, rel_tol=1e-5)


def _params(config, abstract=False):
    make = lambda: build_model(ModelSpec.from_config(config))
    return nnx.state(nnx.eval_shape(make) if abstract else make(), nnx.Param)


def _named(tree):
    flat = jax.tree_util.tree_leaves_with_path(tree)
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def test_weight_decay_mask_skips_norms_router_and_embeddings():
    params = _params(_config(), abstract=True)
    mask = _named(optim.decay_mask(params, decay_embeddings=False))
    decayed = {k for k, v in mask.items() if v}
    assert any("attn/wq" in k for k in decayed) and any("experts/w_up" in k for k in decayed)
    assert not any("scale" in k or k.endswith("ffn/gate") or "embed" in k or "head" in k for k in decayed)
    with_embed = _named(optim.decay_mask(params, decay_embeddings=True))
    assert with_embed["embed/table"] and with_embed["head/w"]


def test_expert_lr_multiplier_scales_only_expert_updates():
    """With SGD-like comparison: the expert update of a multiplier-m run is m times that of the base run."""
    base, scaled = (
        _config(weight_decay=0.0, grad_clip=0.0),
        _config(weight_decay=0.0, grad_clip=0.0, expert_lr_multiplier=0.25),
    )
    params = _params(base)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    updates = {}
    for name, cfg in (("base", base), ("scaled", scaled)):
        tx = optim.make_optimizer(cfg, params)
        state = tx.init(params)
        update = jax.jit(tx.update)
        for _ in range(11):  # past warmup so the LR is non-zero
            u, state = update(grads, state, params)
        updates[name] = _named(u)
    for key, u in updates["base"].items():
        ratio = 0.25 if "experts" in key else 1.0
        np.testing.assert_allclose(np.asarray(updates["scaled"][key]), ratio * np.asarray(u), rtol=1e-6)
