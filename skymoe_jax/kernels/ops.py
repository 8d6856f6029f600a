"""The routing implementation a MoE layer runs: XLA functions or their Pallas twins.

Both sets share one signature per stage, so the MoE block calls `ops.route`,
`ops.expert_positions`, `ops.dispatch` and `ops.combine` without knowing which it got.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax

from skymoe_jax.errors import ConfigError
from skymoe_jax.kernels import common
from skymoe_jax.kernels.combine import combine
from skymoe_jax.kernels.dispatch import dispatch as dispatch_kernel
from skymoe_jax.kernels.positions import expert_positions
from skymoe_jax.kernels.route import route
from skymoe_jax.model.moe import dispatch, router


class RoutingOps(NamedTuple):
    route: Callable[..., router.Routing]  # router.route
    expert_positions: Callable[..., dispatch.Slots]  # dispatch.expert_positions
    dispatch: Callable[..., jax.Array]  # dispatch.dispatch
    combine: Callable[..., jax.Array]  # dispatch.combine


XLA_OPS = RoutingOps(router.route, dispatch.expert_positions, dispatch.dispatch, dispatch.combine)


def pallas_ops(interpret: bool | None = None) -> RoutingOps:
    """The Pallas kernels; interpret None: compiled on a GPU, interpreted elsewhere."""
    bind = functools.partial(functools.partial, interpret=interpret)
    return RoutingOps(bind(route), bind(expert_positions), bind(dispatch_kernel), bind(combine))


def interpreted(impl: str) -> bool:
    """Whether moe.routing_impl=impl runs the kernels in interpret mode here (pallas off a GPU)."""
    return impl == "pallas" and not common.on_gpu()


def routing_ops(impl: str) -> RoutingOps:
    """moe.routing_impl -> ops, decided when the layer is traced.

    `auto` is XLA everywhere: the kernels have not yet been compiled on a GPU against their
    twins and measured faster there (`skymoe acceptance` does both), and off a GPU they can only
    be interpreted, far slower than XLA. `pallas` selects them (interpreted off a GPU).
    """
    if impl in ("xla", "auto"):
        return XLA_OPS
    if impl != "pallas":
        raise ConfigError(f"moe.routing_impl={impl!r} is not one of auto, xla, pallas")
    return pallas_ops()
