"""Fused route kernel: gating logit normalization, float32 softmax or sigmoid scores, top-k, renormalization.

One program takes a block of token rows of the gate logits [T, E] and writes probabilities,
the chosen experts and their weights, and the logits fed to the softmax (for the z-loss):
one read of [T, E], no intermediate in HBM. Top-k is k rounds of argmax-and-mask because
Triton has no sort or top_k; taking the lowest index among equal maxima gives
jax.lax.top_k's tie order, so the XLA twin `router.route` picks the same experts.

The backward pass is a second kernel that recomputes the forward per row (cheaper than
saving [T, E] intermediates) and applies the chain rule through renormalization, top-k
(a gather: its transpose is a scatter into the chosen columns), the score function and normalization.
Group-limited routing is not built here (config validation refuses it with routing_impl=pallas).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from skymoe_jax.kernels.common import compiler_params, out_struct, pow2, resolve_interpret, rows_per_tile
from skymoe_jax.model.moe.router import Routing


class _Static(NamedTuple):
    """Everything the kernels are specialised on (hashable: a custom_vjp static argument)."""

    top_k: int
    gate_norm: bool
    lam: float
    ddof: int
    eps: float
    renormalize: bool
    score: str
    interpret: bool


def route(
    z: jax.Array,
    top_k: int,
    *,
    gate_norm: bool,
    lam: float = 1.0,
    ddof: int = 0,
    eps: float = 1e-6,
    renormalize: bool = True,
    score: str = "softmax",
    num_groups: int = 1,
    top_groups: int = 1,
    interpret: bool | None = None,
) -> Routing:
    """Pallas twin of router.route: gate logits [T, E] -> Routing (probs, weights, experts, logits).

    The signature is router.route's, but only num_groups=1 is built (top_groups is then unused)."""
    if num_groups != 1:
        raise ValueError(f"the Pallas route kernel has no group-limited routing (num_groups={num_groups})")
    static = _Static(
        int(top_k),
        bool(gate_norm),
        float(lam),
        int(ddof),
        float(eps),
        bool(renormalize),
        str(score),
        resolve_interpret(interpret),
    )
    return Routing(*_route(static, z))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _route(static: _Static, z: jax.Array):
    return _forward(static, z)


def _route_fwd(static: _Static, z: jax.Array):
    out = _forward(static, z)
    return out, (z, out[2])


def _route_bwd(static: _Static, residuals, cotangents):
    z, experts = residuals
    d_probs, d_weights, _, d_logits = cotangents  # the experts' cotangent is float0: indices carry none
    return (_backward(static, z, experts, d_probs, d_weights, d_logits),)


_route.defvjp(_route_fwd, _route_bwd)


class _Tile(NamedTuple):
    rows: pl.Slice
    cols: jax.Array  # [ep] column ids
    row_ok: jax.Array  # [block]
    col_ok: jax.Array  # [ep]
    kcols: jax.Array  # [kp]


def _tile(t: int, e: int, block: int, ep: int, kp: int) -> _Tile:
    start = pl.program_id(0) * block
    cols = jnp.arange(ep)
    return _Tile(pl.ds(start, block), cols, start + jnp.arange(block) < t, cols < e, jnp.arange(kp))


def _normalize(z: jax.Array, tile: _Tile, e: int, static: _Static):
    """router.normalize_logits on a tile whose padding columns hold 0: (z', centred z, std)."""
    mean = jnp.sum(z, axis=1, keepdims=True) / e
    u = jnp.where(tile.col_ok[None, :], z - mean, 0.0)
    std = jnp.sqrt(jnp.sum(u * u, axis=1, keepdims=True) / (e - static.ddof))
    return static.lam * u / (std + static.eps), u, std


def _softmax(zn: jax.Array, tile: _Tile) -> jax.Array:
    zn = jnp.where(tile.col_ok[None, :], zn, -jnp.inf)  # padding columns get probability 0
    ex = jnp.exp(zn - jnp.max(zn, axis=1, keepdims=True))
    return ex / jnp.sum(ex, axis=1, keepdims=True)


def _scores(zn: jax.Array, tile: _Tile, static: _Static) -> tuple[jax.Array, jax.Array]:
    """(scores s that top-k picks from and weights come from, probabilities p): the softmax is both; sigmoid
    scores are normalized to sum 1 for p, as router.route does. Padding columns get 0 in both."""
    if static.score == "softmax":
        p = _softmax(zn, tile)
        return p, p
    s = jnp.where(tile.col_ok[None, :], 1.0 / (1.0 + jnp.exp(-zn)), 0.0)
    return s, s / jnp.sum(s, axis=1, keepdims=True)


def _load_logits(ref, tile: _Tile) -> jax.Array:
    mask = tile.row_ok[:, None] & tile.col_ok[None, :]
    return plgpu.load(ref.at[tile.rows, pl.ds(0, tile.cols.shape[0])], mask=mask, other=0.0).astype(jnp.float32)


def _forward_kernel(
    z_ref,
    probs_ref,
    weights_ref,
    experts_ref,
    logits_ref,
    *,
    static: _Static,
    t: int,
    e: int,
    block: int,
    ep: int,
    kp: int,
):
    tile = _tile(t, e, block, ep, kp)
    z = _load_logits(z_ref, tile)
    zn = _normalize(z, tile, e, static)[0] if static.gate_norm else z
    s, p = _scores(zn, tile, static)

    # Scores are >= 0, so -1 marks padding and already-chosen columns: never picked while k <= E.
    remaining = jnp.where(tile.col_ok[None, :], s, -1.0)
    weights = jnp.zeros((block, kp), jnp.float32)
    chosen = jnp.zeros((block, kp), jnp.int32)
    for j in range(static.top_k):
        best = jnp.max(remaining, axis=1, keepdims=True)
        idx = jnp.min(jnp.where(remaining == best, tile.cols[None, :], ep), axis=1, keepdims=True)
        weights = jnp.where(tile.kcols[None, :] == j, best, weights)
        chosen = jnp.where(tile.kcols[None, :] == j, idx, chosen)
        remaining = jnp.where(tile.cols[None, :] == idx, -1.0, remaining)
    if static.renormalize:
        weights = weights / jnp.sum(weights, axis=1, keepdims=True)

    full = tile.row_ok[:, None] & tile.col_ok[None, :]
    picks = tile.row_ok[:, None] & (tile.kcols[None, :] < static.top_k)
    plgpu.store(probs_ref.at[tile.rows, pl.ds(0, ep)], p, mask=full)
    plgpu.store(logits_ref.at[tile.rows, pl.ds(0, ep)], zn, mask=full)
    plgpu.store(weights_ref.at[tile.rows, pl.ds(0, kp)], weights, mask=picks)
    plgpu.store(experts_ref.at[tile.rows, pl.ds(0, kp)], chosen, mask=picks)


def _backward_kernel(
    z_ref,
    experts_ref,
    d_probs_ref,
    d_weights_ref,
    d_logits_ref,
    dz_ref,
    *,
    static: _Static,
    t: int,
    e: int,
    block: int,
    ep: int,
    kp: int,
):
    tile = _tile(t, e, block, ep, kp)
    z = _load_logits(z_ref, tile)
    if static.gate_norm:
        zn, u, std = _normalize(z, tile, e, static)
    else:
        zn = z
    s, p = _scores(zn, tile, static)

    picks = tile.row_ok[:, None] & (tile.kcols[None, :] < static.top_k)
    chosen = plgpu.load(experts_ref.at[tile.rows, pl.ds(0, kp)], mask=picks, other=-1)
    d_w = plgpu.load(d_weights_ref.at[tile.rows, pl.ds(0, kp)], mask=picks, other=0.0).astype(jnp.float32)
    hit = [tile.cols[None, :] == _column(chosen, tile, j)[:, None] for j in range(static.top_k)]
    if static.renormalize:
        # w_j = s_j / c with c = sum of the chosen s: ds_j = (dw_j - sum_i dw_i w_i) / c.
        picked = jnp.zeros((block, kp), jnp.float32)
        for j in range(static.top_k):
            picked = jnp.where(tile.kcols[None, :] == j, jnp.sum(jnp.where(hit[j], s, 0.0), axis=1)[:, None], picked)
        c = jnp.sum(picked, axis=1, keepdims=True)
        d_sel = (d_w - jnp.sum(d_w * picked / c, axis=1, keepdims=True)) / c
    else:
        d_sel = d_w
    d_p = plgpu.load(
        d_probs_ref.at[tile.rows, pl.ds(0, ep)], mask=tile.row_ok[:, None] & tile.col_ok[None, :], other=0.0
    ).astype(jnp.float32)
    if static.score == "softmax":
        d_s = d_p
    else:  # p = s / sum(s)
        d_s = (d_p - jnp.sum(d_p * p, axis=1, keepdims=True)) / jnp.sum(s, axis=1, keepdims=True)
    for j in range(static.top_k):  # top-k is a gather of s; its transpose scatters into the chosen columns
        d_s = d_s + jnp.where(hit[j], _column(d_sel, tile, j)[:, None], 0.0)
    if static.score == "softmax":
        d_zn = p * (d_s - jnp.sum(d_s * p, axis=1, keepdims=True))
    else:
        d_zn = s * (1.0 - s) * d_s
    d_zn = d_zn + _load_logits(d_logits_ref, tile)
    if static.gate_norm:
        # z' = lam * u / (std + eps), u = z - mean(z), std = sqrt(sum u^2 / (E - ddof)). Since sum u = 0,
        # centring passes the std term through unchanged and only recentres the direct term. d std / dz =
        # u / ((E - ddof) std) is taken as 0 where std = 0 (all logits equal), as in router.normalize_logits:
        # z' is differentiable there with Jacobian lam * (I - 1/E) / eps, and 0/0 would make it NaN.
        scale = static.lam / (std + static.eps)
        direct = scale * (d_zn - jnp.sum(d_zn, axis=1, keepdims=True) / e)
        positive = std > 0
        d_std = jnp.where(positive, u / ((e - static.ddof) * jnp.where(positive, std, 1.0)), 0.0)
        through_std = static.lam * jnp.sum(d_zn * u, axis=1, keepdims=True) / (std + static.eps) ** 2 * d_std
        d_z = jnp.where(tile.col_ok[None, :], direct - through_std, 0.0)
    else:
        d_z = d_zn
    plgpu.store(
        dz_ref.at[tile.rows, pl.ds(0, ep)], d_z.astype(dz_ref.dtype), mask=tile.row_ok[:, None] & tile.col_ok[None, :]
    )


def _column(a: jax.Array, tile: _Tile, j: int) -> jax.Array:
    """Column j of a [block, kp] tile as a [block] vector (Triton has no dynamic column slicing)."""
    return jnp.sum(jnp.where(tile.kcols[None, :] == j, a, 0), axis=1)


def _geometry(static: _Static, z: jax.Array):
    t, e = z.shape
    ep, kp = pow2(e), pow2(static.top_k)
    block = rows_per_tile(ep)
    return dict(t=t, e=e, block=block, ep=ep, kp=kp), (pl.cdiv(t, block),)


def _forward(static: _Static, z: jax.Array):
    geometry, grid = _geometry(static, z)
    t, e, k = z.shape[0], z.shape[1], static.top_k
    return pl.pallas_call(
        functools.partial(_forward_kernel, static=static, **geometry),
        out_shape=(
            out_struct((t, e), jnp.float32, z),
            out_struct((t, k), jnp.float32, z),
            out_struct((t, k), jnp.int32, z),
            out_struct((t, e), jnp.float32, z),
        ),
        grid=grid,
        compiler_params=compiler_params(),
        interpret=static.interpret,
        name="skymoe_route",
    )(z)


def _backward(static: _Static, z, experts, d_probs, d_weights, d_logits) -> jax.Array:
    geometry, grid = _geometry(static, z)
    return pl.pallas_call(
        functools.partial(_backward_kernel, static=static, **geometry),
        out_shape=out_struct(z.shape, z.dtype, z, experts, d_probs, d_weights, d_logits),
        grid=grid,
        compiler_params=compiler_params(),
        interpret=static.interpret,
        name="skymoe_route_bwd",
    )(z, experts, d_probs, d_weights, d_logits)
