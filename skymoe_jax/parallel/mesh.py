"""The device mesh and the one table that maps logical parameter axes to mesh axes.

Mesh axes are ("pipeline", "data", "expert"). Two layouts:
- gshard: the expert axis doubles as data parallelism. The batch is split over
  data x expert; attention and dense weights are replicated; experts are split
  over expert (and replicated over data).
- edp (Skywork Expert Data Parallelism): the batch is split over data only;
  attention heads, dense FFN width and the vocabulary are tensor-parallel over the
  expert axis, the same devices that each hold whole experts; experts are
  replicated over data.
In both, the layer stack is split over `pipeline`, stage by stage (model/pipeline.py).
ZeRO-1 splits the optimizer state over data; FSDP splits the parameters too
(their `embed` dimension), gathered where they are used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from skymoe_jax.errors import ConfigError
from skymoe_jax.model.axes import AXES, batch_axes

LAYOUTS = ("gshard", "edp")

# Logical axis -> candidate mesh axes, tried in order. A mesh axis shards at most one
# dimension of a tensor, and only one it divides; otherwise that dimension is replicated.
_LAYOUT_RULES = {
    "gshard": {"expert": ("expert",), "layers": ("pipeline",)},
    "edp": {
        "expert": ("expert",),
        "heads": ("expert",),
        "kv_heads": ("expert",),
        "mlp": ("expert",),
        "vocab": ("expert",),
        "layers": ("pipeline",),
    },
}
_DATA_SPLIT = {"embed": ("data",)}

Rules = dict[str, tuple[str, ...]]


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int, spread: str = "") -> tuple[int, int, int]:
    """(pipeline, data, expert) with a -1 entry resolved to the remaining devices. `spread` (how the
    devices are spread over processes) goes into the refusal: a launch that gave each process one GPU
    of eight shows there."""
    spread = f" ({spread})" if spread else ""
    shape = tuple(config.parallel.mesh)
    if len(shape) != 3 or not all(isinstance(s, int) and (s > 0 or s == -1) for s in shape):
        raise ConfigError(
            f"parallel.mesh={shape} must be three positive sizes (pipeline, data, expert), one of them may be -1"
        )
    if shape.count(-1) > 1:
        raise ConfigError(f"parallel.mesh={shape}: at most one size may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(f"parallel.mesh={shape}: {num_devices} devices{spread} do not split into {known} x -1")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ConfigError(
            f"parallel.mesh={shape} needs {math.prod(shape)} devices but {num_devices} are "
            f"available{spread}; change the sizes or use -1 for one axis"
        )
    return shape


def check_fits(config: ml_collections.ConfigDict, shape: Sequence[int]) -> None:
    """The model and batch split over this mesh; a ConfigError names what does not."""
    pipeline, data, expert = shape
    layout = config.parallel.layout
    e, b = config.moe.num_experts, config.data.batch_size // config.parallel.num_microbatches
    if e and e % expert:
        raise ConfigError(f"moe.num_experts={e} must be divisible by the expert mesh axis ({expert})")
    batch_split = data * expert if layout == "gshard" else data
    if b % batch_split:
        raise ConfigError(
            f"data.batch_size / parallel.num_microbatches = {b} rows must be divisible by the "
            f"{batch_split} devices the batch is split over in layout {layout!r}"
        )
    if e:
        shard_tokens = b // batch_split * config.data.seq_len // (expert if layout == "edp" else 1)
        group = config.moe.group_size or config.data.seq_len
        if shard_tokens % group:
            raise ConfigError(
                f"moe.group_size={group} must divide the {shard_tokens} tokens each device routes "
                f"on mesh {tuple(shape)} (layout {layout!r}); routing groups may not span devices"
            )


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(config, len(devices), device_spread(devices))
    check_fits(config, shape)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * 3)


def device_spread(devices: Sequence[jax.Device]) -> str:
    """'2 processes x 8 local devices, gpu NVIDIA H200': where the devices of a mesh come from."""
    per_process: dict[int, int] = {}
    for d in devices:
        per_process[d.process_index] = per_process.get(d.process_index, 0) + 1
    counts = sorted(set(per_process.values()))
    local = "/".join(map(str, counts))
    n = len(per_process)
    platform, kind = devices[0].platform, devices[0].device_kind
    return f"{n} process{'es' * (n != 1)} x {local} local device{'s' * (counts != [1])}, {platform}" + (
        f" {kind}" if kind != platform else ""
    )


def layout_rules(layout: str) -> Rules:
    """The layout's own splits (over expert and pipeline), without ZeRO-1 / FSDP's split over data."""
    return dict(_LAYOUT_RULES[layout])


def param_rules(parallel: ml_collections.ConfigDict) -> Rules:
    return {**_LAYOUT_RULES[parallel.layout], **(_DATA_SPLIT if parallel.fsdp else {})}


def optimizer_rules(parallel: ml_collections.ConfigDict) -> Rules:
    return {**_LAYOUT_RULES[parallel.layout], **(_DATA_SPLIT if parallel.fsdp or parallel.zero1 else {})}


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], mesh_sizes: dict[str, int], rules: Rules) -> P:
    used, out = set(), []
    for name, dim in zip(axes, shape):
        chosen = None
        for axis in rules.get(name, ()) if name else ():
            size = mesh_sizes.get(axis, 1)
            if axis not in used and size > 1 and dim % size == 0:
                chosen = axis
                used.add(axis)
                break
        out.append(chosen)
    return P(*out)


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a pytree: parameter-like leaves by their logical axes, the rest replicated."""
    sizes = dict(mesh.shape)

    def one(leaf):
        if isinstance(leaf, nnx.Variable) and hasattr(leaf, "axes"):
            return NamedSharding(mesh, partition_spec(leaf.axes, leaf.shape, sizes, rules))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, tree, is_leaf=lambda v: isinstance(v, nnx.Variable))


def with_shardings(abstract: Any, shardings: Any, make=None) -> Any:
    """abstract (shapes and dtypes, Variables kept) with each leaf replaced by make(leaf, sharding).

    `shardings` is a prefix of `abstract` (a NamedSharding where `abstract` has a Variable);
    the default `make` gives ShapeDtypeStructs carrying the sharding, i.e. restore targets.
    """
    make = make or (lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding))

    def one(sharding, leaf):
        if isinstance(leaf, nnx.Variable):
            return leaf.replace(value=make(leaf.get_value(), sharding))
        return make(leaf, sharding)

    return jax.tree.map(one, shardings, abstract)


def state_shardings(abstract_state, mesh: Mesh, config: ml_collections.ConfigDict):
    """Shardings of a TrainState: parameters and optimizer state by the rules, scalars replicated."""
    replicated = NamedSharding(mesh, P())
    return abstract_state.replace(
        step=replicated,
        alpha=None if abstract_state.alpha is None else replicated,
        bias=None if abstract_state.bias is None else replicated,
        params=tree_shardings(abstract_state.params, mesh, param_rules(config.parallel)),
        opt_state=tree_shardings(abstract_state.opt_state, mesh, optimizer_rules(config.parallel)),
    )


def batch_sharding(mesh: Mesh, layout: str) -> NamedSharding:
    return NamedSharding(mesh, P(batch_axes(layout)))


def check_process_rows(mesh: Mesh, layout: str, batch_size: int, num_streams: int) -> None:
    """Each process must hold its own equal, contiguous share of the batch rows (it reads only those)."""
    count, index = jax.process_count(), jax.process_index()
    if count == 1:
        return
    if num_streams % count:
        raise ConfigError(f"data.num_streams={num_streams} must be divisible by the {count} processes")
    indices = batch_sharding(mesh, layout).addressable_devices_indices_map((batch_size,))
    rows = sorted({(i[0].start or 0, batch_size if i[0].stop is None else i[0].stop) for i in indices.values()})
    want = (index * batch_size // count, (index + 1) * batch_size // count)
    if (rows[0][0], rows[-1][1]) != want or any(a[1] != b[0] for a, b in zip(rows, rows[1:])):
        raise ConfigError(
            f"parallel.mesh={tuple(mesh.shape.values())} with layout {layout!r} gives process {index} "
            f"batch rows {rows}, not its own share {want}; split the batch axes across processes"
        )


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, layout: str) -> dict[str, jax.Array]:
    """This process's rows of the batch -> global arrays split over the batch axes."""
    sharding = batch_sharding(mesh, layout)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
