"""The routing implementation a MoE layer runs: XLA functions or their Pallas twins.

Both sets share one signature per stage, so the MoE block calls `ops.route`,
`ops.expert_positions`, `ops.dispatch` and `ops.combine` without knowing which it got.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax

from skymoe_jax.errors import ConfigError
from skymoe_jax.kernels import common
from skymoe_jax.kernels.combine import combine
from skymoe_jax.kernels.permute import permute
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
    return RoutingOps(bind(route), bind(expert_positions), bind(permute), bind(combine))


def interpreted(impl: str) -> bool:
    """Whether moe.routing_impl=impl runs the kernels in interpret mode here (pallas off a GPU)."""
    return impl == "pallas" and not common.on_gpu()


def routing_ops(impl: str) -> RoutingOps:
    """moe.routing_impl -> ops, decided when the layer is traced.

    `auto` is Pallas on a GPU and XLA elsewhere: interpret mode exists to check the kernels
    and is far slower than XLA. `pallas` off a GPU interprets them.
    """
    if impl == "xla" or (impl == "auto" and not common.on_gpu()):
        return XLA_OPS
    if impl not in ("auto", "pallas"):
        raise ConfigError(f"moe.routing_impl={impl!r} is not one of auto, xla, pallas")
    return pallas_ops()
