"""What every routing kernel shares: the Triton compiler params, interpret-mode selection,
block-size arithmetic and output types."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import ManualAxisType

# Elements one program holds per live tile. Triton keeps tiles in registers; with 4 warps
# (128 threads) 4096 fp32 elements is 32 registers a thread per tile, which leaves room for
# the handful of tiles each kernel keeps alive without spilling.
TILE_ELEMENTS = 4096


def compiler_params(num_warps: int = 4) -> plgpu.CompilerParams:
    """Triton params, passed explicitly: jax 0.10 lowers a GPU pallas_call through Mosaic GPU
    unless Triton params are given, jax 0.11+ through Triton only, so this pins one meaning."""
    return plgpu.CompilerParams(num_warps=num_warps)


_TRACED_FOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("traced_for", default=None)


def platform() -> str:
    """The platform (cpu, gpu, ...) of the program being traced: the one `traced_for` names, else that of the
    devices of the mesh in context (jax.set_mesh, which the runtime traces its steps under), else JAX's default
    backend. A program compiled for GPUs that are not this machine's (a deviceless compile) takes the GPU's
    choices."""
    named = _TRACED_FOR.get()
    if named is not None:
        return named
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


@contextlib.contextmanager
def traced_for(name: str) -> Iterator[None]:
    """Trace for platform `name` (cpu, gpu) with no devices of it: the planner traces layers as they would run
    there."""
    token = _TRACED_FOR.set(name)
    try:
        yield
    finally:
        _TRACED_FOR.reset(token)


def on_gpu() -> bool:
    """Whether kernels compile (the traced program's platform is a GPU) or can only be interpreted."""
    return platform() == "gpu"


def resolve_interpret(interpret: bool | None) -> bool:
    """None: compile for the GPU when the traced program runs on one, else run in interpret mode."""
    return not on_gpu() if interpret is None else interpret


def pow2(n: int) -> int:
    """Smallest power of two >= n (Triton needs every block dimension to be one)."""
    return pl.next_power_of_2(max(1, n))


def rows_per_tile(width: int, cap: int = 128, floor: int = 16) -> int:
    """Rows of a [rows, width] tile within TILE_ELEMENTS (past it only at `floor`), a power of two in [floor, cap]."""
    return max(floor, min(cap, TILE_ELEMENTS // pow2(width)))


def vary_like(a: jax.Array, *operands: jax.Array) -> jax.Array:
    """a, cast to vary over every shard_map axis one of operands varies over (a no-op off a mesh). A custom
    gradient or an FFI call must return values of its inputs' type; the cast's own gradient sums over the axes
    it adds, as autodiff does where JAX inserts the cast itself."""
    varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in operands))
    missing = varying - jax.typeof(a).manual_axis_type.varying
    return jax.lax.pcast(a, tuple(sorted(missing)), to="varying") if missing else a


def out_struct(shape: tuple[int, ...], dtype, *operands: jax.Array) -> jax.ShapeDtypeStruct:
    """A kernel output's type. Inside shard_map (check_vma) a pallas_call output must say which
    mesh axes it varies over; it varies over every axis one of its operands varies over."""
    varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in operands))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=ManualAxisType(varying=varying))
