"""Grouped matmul for the GPU (Triton): rows sorted by expert times that expert's matrix, the dropless experts' FFN.

x [A, K] holds E consecutive groups of rows (group_sizes [E], summing to at most A; the rows past the sum come
out zero, as jax.lax.ragged_dot's do) and out[rows of e] = x[rows of e] @ w[e]. XLA:GPU compiles ragged_dot
into a masked copy of x per expert and one dense [A, E*K] x [E*K, N] matmul (E times the FLOPs, E copies of x
in temporaries), so the dropless layout needs this kernel to cost what the tokens cost.

Tiling (megablox's): the rows are cut into fixed tiles of `block_m` rows that ignore the group boundaries, and a
table, built by XLA before the call, lists one work item per (row tile, group) pair that overlap: a tile
straddling groups is visited once per group with its other rows masked off. Tiles aligned to group starts
(vLLM's fused_moe pads each group to a tile multiple) would need the rows moved into a padded buffer first, a
gather and up to E partly empty tiles more; straddling tiles cost at most E - 1 extra tile visits, and each
visit loads and multiplies only its own group's weights. The grid is static, so a table always has
cdiv(A, block_m) + E items (the most it can need, with the rows past the last group as one more group that
writes zeros); the items it does not use do nothing. Each item loops over K in `block_k` steps, a trip count
that depends on its group (0 for the zero rows and unused items); Triton lowers the loop with its dynamic bound
as an scf.for it pipelines.
The output column tile varies fastest over the programs in both kernels: the programs running at once
then share their rows of x (and dy), read from device memory about once and from L2 by the others, as the
expert's weights are.

Backward: dx = dy w[e]^T is the same kernel on the same table with w read transposed, and dw[e] = x_e^T dy_e
is a second kernel over (expert, K tile, N tile) that loops over its expert's rows in `block_k` steps (a
dynamic trip count again: no rows of other experts are visited) and accumulates x^T dy. bf16 or float32
inputs, float32 accumulation; outputs in the inputs' dtype. The XLA twin is jax.lax.ragged_dot, which
model/moe/experts.py runs off GPUs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from skymoe_jax.kernels.common import compiler_params, out_struct, pow2, resolve_interpret, vary_like

# 128 x 128 float32 accumulators are Triton's usual matmul tile on A100 / H100 (enough work per K step to keep
# the tensor cores fed); 8 warps keep it at 64 registers a thread, half of what 4 warps would need. Float32 inputs
# take 64 KiB of shared memory per pipeline stage at these sizes, which XLA:GPU compiles for an A800
# (tests/test_gpu_compile.py; twice the contraction step is refused for lack of shared memory).
_BLOCK_M, _BLOCK_N, _BLOCK_K, _WARPS = 128, 128, 64, 8


class Tiles(NamedTuple):
    """Tile sizes, powers of two of at least 16 (tl.dot's smallest): block_m x block_n outputs per program,
    block_k deep contraction steps. block_m is also the table's row tile; the dW kernel's outputs are
    [block_m of K, block_n of N] and it steps through the rows block_k at a time."""

    block_m: int = _BLOCK_M
    block_n: int = _BLOCK_N
    block_k: int = _BLOCK_K


class _Static(NamedTuple):
    tiles: Tiles
    interpret: bool


class _Table(NamedTuple):
    """One entry per work item: its group (E for the rows past the last group, E + 1 for an unused item), its row
    tile, and the rows [lo, hi) of that tile it computes."""

    group: jax.Array
    tile: jax.Array
    lo: jax.Array
    hi: jax.Array


def grouped_matmul(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    tiles: Tiles | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """x [A, K] sorted by group, w [E, K, N], group_sizes [E] (sum <= A) -> [A, N] in x's dtype; differentiable
    in x and w. tiles None: the defaults, shrunk to the operands' powers of two."""
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1] or group_sizes.shape != w.shape[:1]:
        raise ValueError(f"grouped_matmul: x {x.shape}, w {w.shape}, group_sizes {group_sizes.shape} do not fit")
    # Pallas's Triton lowering computes element offsets in int32: past 2^31 elements they would wrap.
    largest = max(x.size, w.size, x.shape[0] * w.shape[2])
    if largest >= 2**31:
        raise ValueError(f"grouped_matmul: an operand of {largest} elements is past the kernels' int32 offsets")
    tiles = tiles or Tiles()
    static = _Static(tiles._replace(block_m=_fit(tiles.block_m, x.shape[0])), resolve_interpret(interpret))
    # The custom gradient returns its inputs' types: x and w vary over the same mesh axes first (see vary_like).
    x, w = vary_like(x, w), vary_like(w, x)
    return _grouped_matmul(static, x, w, group_sizes.astype(jnp.int32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _grouped_matmul(static: _Static, x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    return _gmm(static, x, w, _table(group_sizes, x.shape[0], static.tiles.block_m), transpose_w=False)


def _fwd(static: _Static, x: jax.Array, w: jax.Array, group_sizes: jax.Array):
    table = _table(group_sizes, x.shape[0], static.tiles.block_m)
    return _gmm(static, x, w, table, transpose_w=False), (x, w, group_sizes, table)


def _bwd(static: _Static, saved, dy: jax.Array):
    x, w, group_sizes, table = saved
    dx = _gmm(static, dy, w, table, transpose_w=True)
    return dx, _tgmm(static, x, dy, group_sizes, w.dtype), None


_grouped_matmul.defvjp(_fwd, _bwd)


def _fit(cap: int, size: int) -> int:
    """A tile dimension for an operand dimension of `size`: the cap, or less where the operand is smaller."""
    return max(16, min(cap, pow2(size)))


def _bounds(group_sizes: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
    """Each group's first row and the row past its last, within the rows there are."""
    ends = jnp.minimum(jnp.cumsum(group_sizes), rows)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]]), ends


def _table(group_sizes: jax.Array, rows: int, block_m: int) -> _Table:
    """The work items of cdiv(rows, block_m) row tiles over the groups (group_sizes, then the rest of the rows):
    a few small XLA ops on [E] and [items] vectors."""
    e = group_sizes.shape[0]
    starts, ends = _bounds(jnp.concatenate([group_sizes, jnp.array([rows], jnp.int32)]), rows)  # group E: the rest
    first = starts // block_m
    count = jnp.where(ends > starts, (ends - 1) // block_m - first + 1, 0)
    item_end = jnp.cumsum(count)
    items = pl.cdiv(rows, block_m) + e
    i = jnp.arange(items, dtype=jnp.int32)
    group = jnp.sum(i[:, None] >= item_end[None, :], axis=1, dtype=jnp.int32)  # e + 1 past the last used item
    used = group <= e
    g = jnp.minimum(group, e)
    tile = first[g] + i - (item_end[g] - count[g])
    lo = jnp.where(used, jnp.maximum(starts[g], tile * block_m), 0)
    hi = jnp.where(used, jnp.minimum(ends[g], (tile + 1) * block_m), 0)
    return _Table(group, jnp.where(used, tile, 0), lo, hi)


def _gmm(static: _Static, x: jax.Array, w: jax.Array, table: _Table, *, transpose_w: bool) -> jax.Array:
    """out[r] = x[r] @ w[e] (w[e]^T with transpose_w) for the rows r of group e; zero past the last group."""
    (a, k), e = x.shape, w.shape[0]
    n = w.shape[1] if transpose_w else w.shape[2]
    tiles = Tiles(static.tiles.block_m, _fit(static.tiles.block_n, n), _fit(static.tiles.block_k, k))
    return pl.pallas_call(
        functools.partial(_gmm_kernel, k=k, n=n, e=e, tiles=tiles, transpose_w=transpose_w),
        out_shape=out_struct((a, n), x.dtype, x, w, *table),
        # One grid dimension: CUDA limits the second and third to 65,535 programs, which the items could exceed.
        grid=(pl.cdiv(n, tiles.block_n) * table.group.shape[0],),
        compiler_params=compiler_params(num_warps=_WARPS),
        interpret=static.interpret,
        name="skymoe_grouped_matmul_t" if transpose_w else "skymoe_grouped_matmul",
    )(*table, x, w)


def _gmm_kernel(
    group_ref, tile_ref, lo_ref, hi_ref, x_ref, w_ref, out_ref, *, k: int, n: int, e: int, tiles: Tiles, transpose_w
):
    bm, bn, bk = tiles
    column_tiles = pl.cdiv(n, bn)
    item = pl.program_id(0) // column_tiles
    group, lo, hi = group_ref[item], lo_ref[item], hi_ref[item]
    r0, c0 = tile_ref[item] * bm, pl.program_id(0) % column_tiles * bn
    rows, cols = r0 + jnp.arange(bm), c0 + jnp.arange(bn)
    row_ok, col_ok = (rows >= lo) & (rows < hi), cols < n
    g = jnp.minimum(group, e - 1)  # group e (the rows past the last group) loads nothing: its trip count is 0

    def step(j, acc):
        inner = j * bk + jnp.arange(bk)
        inner_ok = inner < k
        xt = plgpu.load(x_ref.at[pl.ds(r0, bm), pl.ds(j * bk, bk)], mask=row_ok[:, None] & inner_ok[None, :], other=0)
        if transpose_w:
            wt = plgpu.load(
                w_ref.at[g, pl.ds(c0, bn), pl.ds(j * bk, bk)], mask=col_ok[:, None] & inner_ok[None, :], other=0
            )
        else:
            wt = plgpu.load(
                w_ref.at[g, pl.ds(j * bk, bk), pl.ds(c0, bn)], mask=inner_ok[:, None] & col_ok[None, :], other=0
            )
        return acc + plgpu.dot(xt, wt, trans_b=transpose_w)

    # 1 for a real group, 0 past them; min / max because Triton lowers a scalar select to an i1 loop bound.
    trips = pl.cdiv(k, bk) * jnp.clip(e - group, 0, 1)
    acc = jax.lax.fori_loop(0, trips, step, jnp.zeros((bm, bn), jnp.float32))
    plgpu.store(
        out_ref.at[pl.ds(r0, bm), pl.ds(c0, bn)], acc.astype(out_ref.dtype), mask=row_ok[:, None] & col_ok[None, :]
    )


def _tgmm(static: _Static, x: jax.Array, dy: jax.Array, group_sizes: jax.Array, dtype) -> jax.Array:
    """dw[e] = x[rows of e]^T dy[rows of e]: [E, K, N] in dtype, zero for an empty group."""
    (a, k), n, e = x.shape, dy.shape[1], group_sizes.shape[0]
    starts, ends = _bounds(group_sizes, a)
    # The output tile is [block_m, block_n] with K as its rows; the contraction over the group's rows steps by
    # block_k, so the loads are a forward's tiles transposed.
    tiles = Tiles(_fit(static.tiles.block_m, k), _fit(static.tiles.block_n, n), static.tiles.block_k)
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, k=k, n=n, tiles=tiles),
        out_shape=out_struct((e, k, n), dtype, x, dy, starts, ends),
        grid=(pl.cdiv(n, tiles.block_n), pl.cdiv(k, tiles.block_m), e),
        compiler_params=compiler_params(num_warps=_WARPS),
        interpret=static.interpret,
        name="skymoe_grouped_matmul_dw",
    )(starts, ends, x, dy)


def _tgmm_kernel(starts_ref, ends_ref, x_ref, dy_ref, out_ref, *, k: int, n: int, tiles: Tiles):
    bm, bn, bk = tiles
    group = pl.program_id(2)
    start, end = starts_ref[group], ends_ref[group]
    k0, c0 = pl.program_id(1) * bm, pl.program_id(0) * bn
    out_rows, cols = k0 + jnp.arange(bm), c0 + jnp.arange(bn)
    out_ok, col_ok = out_rows < k, cols < n

    def step(j, acc):
        r0 = start + j * bk
        row_ok = r0 + jnp.arange(bk) < end
        xt = plgpu.load(x_ref.at[pl.ds(r0, bk), pl.ds(k0, bm)], mask=row_ok[:, None] & out_ok[None, :], other=0)
        dyt = plgpu.load(dy_ref.at[pl.ds(r0, bk), pl.ds(c0, bn)], mask=row_ok[:, None] & col_ok[None, :], other=0)
        return acc + plgpu.dot(xt, dyt, trans_a=True)

    acc = jax.lax.fori_loop(0, pl.cdiv(end - start, bk), step, jnp.zeros((bm, bn), jnp.float32))
    plgpu.store(
        out_ref.at[group, pl.ds(k0, bm), pl.ds(c0, bn)],
        acc.astype(out_ref.dtype),
        mask=out_ok[:, None] & col_ok[None, :],
    )
