"""Row-gather kernels that dispatch and combine (and their backward passes) are built from.

Rows only ever move by gathers: each output element is computed by exactly one program and
written once, so results are deterministic and no float atomics are needed. The transpose of
a gather through an injective index map is the gather through its inverse, which
`slot_sources` builds with the one scatter here, of int32 ids into distinct slots
(assignments fill distinct slots, so the inverse is well defined).

Indices < 0 mean "nothing here": the load is masked and the row contributes zero. Loads of
gathered rows index with [rows, 1] x [1, cols] arrays, the form both the Triton lowering and
interpret mode accept for a masked row gather.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from skymoe_jax.kernels.common import compiler_params, out_struct, pow2, rows_per_tile

# Columns per program: a 256-wide tile keeps every load a 512-1024 byte contiguous segment
# of a row (full coalescing) while the row count stays large enough to hide latency.
_MAX_COLS = 256


def _tiles(rows: int, width: int) -> tuple[int, int, tuple[int, int]]:
    cols = min(pow2(width), _MAX_COLS)
    block = rows_per_tile(cols)
    return block, cols, (pl.cdiv(rows, block), pl.cdiv(width, cols))


def _row_col(rows: int, width: int, block: int, cols: int):
    """This program's row slice, column ids and in-bounds masks."""
    r0, c0 = pl.program_id(0) * block, pl.program_id(1) * cols
    col_ids = c0 + jnp.arange(cols)
    return pl.ds(r0, block), col_ids, r0 + jnp.arange(block) < rows, col_ids < width


def _load_rows(ref, index: jax.Array, col_ids: jax.Array, col_ok: jax.Array) -> jax.Array:
    """ref[index[r], col_ids] as float32, zero where index < 0 or the column is past the end."""
    ok = index >= 0
    return plgpu.load(
        ref.at[jnp.where(ok, index, 0)[:, None], col_ids[None, :]], mask=ok[:, None] & col_ok[None, :], other=0
    ).astype(jnp.float32)


def _load_column(ref, rows: pl.Slice, row_ok: jax.Array, j: int, other) -> jax.Array:
    """ref[rows, j] as a [block] vector. j goes in as an int32 scalar array: interpret mode cannot
    discharge a Python int index next to a slice."""
    return plgpu.load(ref.at[rows, jnp.int32(j)], mask=row_ok, other=other)


def slot_sources(slots: jax.Array, num_slots: int, *, interpret: bool) -> jax.Array:
    """Inverse of the assignment -> slot map: [num_slots] int32 flat assignment t*k + j, or -1 if empty.

    A scatter of assignment ids: slots are distinct, so no two writes collide. Dropped
    assignments (slot -1) and the tail past the last assignment write to one extra dummy
    entry, which is cut off; it keeps the store unmasked and never aliases a real slot.
    """
    flat = slots.reshape(-1).astype(jnp.int32)
    n = flat.shape[0]
    block = 1024  # int32 ids: 4 KiB a program, 8 a thread at 4 warps
    # The kernel writes only filled slots; starting from an aliased all-empty buffer spares a fill pass.
    empty = jnp.full((num_slots + 1,), -1, jnp.int32)
    sources = pl.pallas_call(
        functools.partial(_slot_sources_kernel, n=n, num_slots=num_slots, block=block),
        out_shape=out_struct((num_slots + 1,), jnp.int32, flat, empty),
        grid=(pl.cdiv(n, block),),
        input_output_aliases={1: 0},
        compiler_params=compiler_params(),
        interpret=interpret,
        name="skymoe_slot_sources",
    )(flat, empty)
    return sources[:num_slots]


def _slot_sources_kernel(slots_ref, _, sources_ref, *, n: int, num_slots: int, block: int):
    ids = pl.program_id(0) * block + jnp.arange(block)
    slot = plgpu.load(slots_ref.at[pl.ds(pl.program_id(0) * block, block)], mask=ids < n, other=-1)
    plgpu.store(sources_ref.at[jnp.where(slot >= 0, slot, num_slots)], ids)


def gather_rows(
    x: jax.Array, sources: jax.Array, per_row: int, scale: jax.Array | None = None, *, interpret: bool
) -> jax.Array:
    """out[r] = scale[sources[r]] * x[sources[r] // per_row], zero where sources[r] < 0: [R, d] in x's dtype.

    With sources from slot_sources, per_row = k maps an assignment to its token row. scale
    [S*k] (optional) weights each assignment, cast to x's dtype first as dispatch.combine does.
    """
    r, d = sources.shape[0], x.shape[1]
    block, cols, grid = _tiles(r, d)
    operands = (sources, x) if scale is None else (sources, x, scale.astype(x.dtype))
    return pl.pallas_call(
        functools.partial(
            _gather_rows_kernel, r=r, d=d, per_row=per_row, block=block, cols=cols, scaled=scale is not None
        ),
        out_shape=out_struct((r, d), x.dtype, *operands),
        grid=grid,
        compiler_params=compiler_params(),
        interpret=interpret,
        name="skymoe_gather_rows",
    )(*operands)


def _gather_rows_kernel(*refs, r: int, d: int, per_row: int, block: int, cols: int, scaled: bool):
    sources_ref, x_ref, *scale_ref, out_ref = refs
    rows, col_ids, row_ok, col_ok = _row_col(r, d, block, cols)
    src = plgpu.load(sources_ref.at[rows], mask=row_ok, other=-1)
    vals = _load_rows(x_ref, jnp.where(src >= 0, src // per_row, -1), col_ids, col_ok)
    if scaled:
        ok = src >= 0
        vals = vals * plgpu.load(scale_ref[0].at[jnp.where(ok, src, 0)], mask=ok, other=0).astype(jnp.float32)[:, None]
    plgpu.store(
        out_ref.at[rows, pl.ds(pl.program_id(1) * cols, cols)],
        vals.astype(out_ref.dtype),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def gather_sum(y: jax.Array, index: jax.Array, weights: jax.Array | None = None, *, interpret: bool) -> jax.Array:
    """out[t] = sum_j weights[t, j] * y[index[t, j]] over index >= 0: [S, d] in y's dtype.

    Accumulates in float32; weights (None: all ones) are cast to y's dtype first, as
    dispatch.combine does.
    """
    (s, k), d = index.shape, y.shape[1]
    block, cols, grid = _tiles(s, d)
    operands = (index, y) if weights is None else (index, y, weights.astype(y.dtype))
    return pl.pallas_call(
        functools.partial(_gather_sum_kernel, s=s, d=d, k=k, block=block, cols=cols, weighted=weights is not None),
        out_shape=out_struct((s, d), y.dtype, *operands),
        grid=grid,
        compiler_params=compiler_params(),
        interpret=interpret,
        name="skymoe_gather_sum",
    )(*operands)


def _gather_sum_kernel(*refs, s: int, d: int, k: int, block: int, cols: int, weighted: bool):
    index_ref, y_ref, *weights_ref, out_ref = refs
    rows, col_ids, row_ok, col_ok = _row_col(s, d, block, cols)
    acc = jnp.zeros((block, cols), jnp.float32)
    for j in range(k):
        vals = _load_rows(y_ref, _load_column(index_ref, rows, row_ok, j, -1), col_ids, col_ok)
        if weighted:
            vals = vals * _load_column(weights_ref[0], rows, row_ok, j, 0).astype(jnp.float32)[:, None]
        acc = acc + vals
    plgpu.store(
        out_ref.at[rows, pl.ds(pl.program_id(1) * cols, cols)],
        acc.astype(out_ref.dtype),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def gather_dot(a: jax.Array, y: jax.Array, index: jax.Array, *, interpret: bool) -> jax.Array:
    """out[t, j] = <a[t], y[index[t, j]]> (0 where index < 0): [S, k] float32.

    One program owns a block of rows and loops over the width, so each dot product is
    summed in one place in a fixed order.
    """
    (s, k), d = index.shape, a.shape[1]
    cols = min(pow2(d), _MAX_COLS)
    block = rows_per_tile(cols * k)
    return pl.pallas_call(
        functools.partial(_gather_dot_kernel, s=s, d=d, k=k, block=block, cols=cols),
        out_shape=out_struct((s, k), jnp.float32, index, a, y),
        grid=(pl.cdiv(s, block),),
        compiler_params=compiler_params(),
        interpret=interpret,
        name="skymoe_gather_dot",
    )(index, a, y)


def _gather_dot_kernel(index_ref, a_ref, y_ref, out_ref, *, s: int, d: int, k: int, block: int, cols: int):
    r0 = pl.program_id(0) * block
    rows, row_ok = pl.ds(r0, block), r0 + jnp.arange(block) < s
    index = [_load_column(index_ref, rows, row_ok, j, -1) for j in range(k)]

    def step(c, sums):
        col_ids = c * cols + jnp.arange(cols)
        col_ok = col_ids < d
        a = plgpu.load(a_ref.at[rows, pl.ds(c * cols, cols)], mask=row_ok[:, None] & col_ok[None, :], other=0).astype(
            jnp.float32
        )
        return tuple(
            total + jnp.sum(a * _load_rows(y_ref, idx, col_ids, col_ok), axis=1) for total, idx in zip(sums, index)
        )

    sums = jax.lax.fori_loop(0, pl.cdiv(d, cols), step, tuple(jnp.zeros((block,), jnp.float32) for _ in range(k)))
    for j in range(k):
        plgpu.store(out_ref.at[rows, jnp.int32(j)], sums[j], mask=row_ok)  # int32 j: see _load_column
