"""Per-device memory and communication of a config on a mesh that need not exist here.

Bytes per device of parameters, gradients and Adam state follow the sharding rules of parallel/mesh.py
applied to the abstract parameters of the model as this mesh stores them: with a pipeline the layer
stack is stored stage by stage, each padded to the longest stage (parallel.pipeline_stage_layers, or an
even split), and split over `pipeline`, so every device holds the longest stage's layers. The embedding,
final norm and head are not split over `pipeline`: every stage holds them (the embedding runs before the
pipeline region, model/pipeline.py). Per-stage training FLOPs per token and the pipeline's utilization
(1 - bubble, with stage imbalance; GPipe or circular) come from metrics/flops.py for parallel.num_microbatches.
All-to-all bytes are what one device sends per step: each MoE layer exchanges its slot buffer twice in each
forward pass and twice in the backward; `exchange_passes` says how many forwards of it a step runs. Dropless,
the buffer is the device's assigned rows (k x tokens; each is sent once, whatever the balance) where the platform
has ragged-all-to-all, and XLA:CPU's fallback's per-peer buffers of the worst case elsewhere
(model/moe/ragged_exchange.py); the share that stays on the device is taken as 1 / expert, as with balanced
routing.
Activations (what the backward keeps, per term) come from parallel/activations.py; the peak per device
is the state (parameters, gradients, Adam) plus the activations.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import ml_collections
from flax import nnx

from skymoe_jax.config import capacity, validate
from skymoe_jax.errors import ConfigError
from skymoe_jax.kernels import common
from skymoe_jax.metrics.flops import pipeline_utilization, stage_flops_per_token
from skymoe_jax.model.mesh_layout import MeshLayout
from skymoe_jax.model.moe import ragged_exchange
from skymoe_jax.model.spec import ModelSpec
from skymoe_jax.model.transformer import build_model
from skymoe_jax.parallel.activations import Activations, activation_memory
from skymoe_jax.parallel.mesh import AXES, check_fits, layout_rules, optimizer_rules, param_rules, partition_spec


@dataclasses.dataclass(frozen=True)
class Plan:
    mesh: tuple[int, int, int]
    layout: str
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    all_to_all_bytes: float  # sent per device per step
    exchange: str  # how the MoE layers reach the experts on other devices ("" without an expert axis)
    tokens_per_device: int
    stage_layers: tuple[int, ...]  # per virtual stage (pipeline x repeats of them) when pipelined
    stage_flops_per_token: tuple[float, ...]  # training FLOPs per token of each virtual stage (head on the last)
    microbatches: int
    pipeline_utilization: float  # 1 - bubble (stage imbalance included)
    repeats: int  # parallel.pipeline_repeats: chunks per device (1 = GPipe)
    activations: Activations

    @property
    def total_bytes(self) -> float:
        """The train state: parameters, gradients and Adam's moments."""
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes

    @property
    def peak_bytes(self) -> float:
        return self.total_bytes + self.activations.total


def forward_passes(remat: str, pipelined: bool) -> int:
    """Forward passes of the layers in one train step: one, and one more under full rematerialization; a
    pipeline recomputes each tick in its backward (model/pipeline.py), and under full remat each layer again."""
    return 1 + (remat == "full") + pipelined


def exchange_passes(remat: str, pipelined: bool) -> int:
    """Forward passes of the MoE layers' all-to-all in one train step: one, one more under any remat (`dots` saves
    matmuls, not the exchange), and one more in a pipeline (its recomputed ticks). Counted in the compiled programs'
    HLO (tests/test_hlo.py)."""
    return 1 + (remat != "none") + pipelined


def parse_mesh(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--mesh={text!r} must be three positive sizes PIPELINE,DATA,EXPERT, e.g. 12,32,4")
    return shape  # type: ignore[return-value]


def _abstract_params(spec: ModelSpec, stage_layers: tuple[int, ...]) -> nnx.State:
    """Shapes of the model's parameters as stored for a pipeline split; a mesh search plans many layouts
    of few distinct models (neither the rematerialization policy nor the MoE layout changes them)."""
    return _params_of(dataclasses.replace(spec, remat="none"), MeshLayout(stage_layers=stage_layers))


@functools.lru_cache(maxsize=256)
def _params_of(spec: ModelSpec, mesh_layout: MeshLayout) -> nnx.State:
    return nnx.state(nnx.eval_shape(lambda: build_model(spec, mesh_layout=mesh_layout)), nnx.Param)


def plan(config: ml_collections.ConfigDict, mesh: tuple[int, int, int], platform: str | None = None) -> Plan:
    """The per-device memory of config on mesh (pipeline, data, expert), run on `platform` (cpu or gpu; default:
    this machine's), which decides what attention_impl=auto runs."""
    pipeline, data, expert = mesh
    planned = config.copy_and_resolve_references()
    planned.parallel.mesh = tuple(mesh)
    validate(planned)
    check_fits(planned, mesh)
    stored = MeshLayout.from_config(planned).stage_layers
    stages = stored or (config.model.num_layers,)
    spec = ModelSpec.from_config(planned)
    sizes = dict(zip(AXES, mesh))
    if spec.num_experts and spec.num_experts % expert:
        raise ConfigError(f"moe.num_experts={spec.num_experts} must be divisible by the expert axis ({expert})")
    params = _abstract_params(spec, stored)

    def per_device(rules, bytes_per_value, layers_only=False):
        total = 0.0
        for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
            if layers_only and "layers" not in v.axes:
                continue
            pspec = partition_spec(v.axes, v.shape, sizes, rules)
            total += math.prod(v.shape) / math.prod(sizes[a] for a in pspec if a) * bytes_per_value(v)
        return total

    param_bytes = per_device(param_rules(planned.parallel), lambda v: v.dtype.itemsize)
    # The layers' gradients as the backward makes them (before any ZeRO-1 / FSDP split), and as they are split.
    layer_grad_bytes = per_device(layout_rules(planned.parallel.layout), lambda v: v.dtype.itemsize, layers_only=True)
    split_grads = planned.parallel.zero1 or planned.parallel.fsdp
    grad_rules = optimizer_rules(planned.parallel) if split_grads else param_rules(planned.parallel)
    grad_bytes = per_device(grad_rules, lambda v: v.dtype.itemsize)
    split_layer_grad_bytes = per_device(grad_rules, lambda v: v.dtype.itemsize, layers_only=True)
    # Adam's mu and nu: optax keeps them in the parameter's dtype.
    opt_bytes = per_device(optimizer_rules(planned.parallel), lambda v: 2 * v.dtype.itemsize)

    tokens = config.data.batch_size * config.data.seq_len // (data * expert)
    a2a, exchange = 0.0, ""
    if spec.num_experts and expert > 1:
        group = spec.group_size or config.data.seq_len
        runs_on = platform or common.platform()
        if not spec.dropless:
            exchange = "capacity slots by all-to-all"
            slots = capacity(group, spec.num_experts, spec.top_k, spec.capacity_factor)
            rows = spec.num_experts * (tokens // group) * slots
        elif ragged_exchange.native(runs_on):
            exchange = "assigned rows by ragged all-to-all"
            rows = spec.top_k * tokens
        else:
            exchange = f"assigned rows in worst-case buffers per peer by all-to-all: no ragged all-to-all on {runs_on}"
            rows = ragged_exchange.receive_rows(tokens, spec.top_k, spec.num_experts, expert)
        buffer = rows * spec.d_model * spec.compute_dtype.itemsize
        moe_layers_per_stage = max(stages) * planned.parallel.pipeline_repeats if spec.num_moe_layers else 0
        exchanges = 2 * exchange_passes(spec.remat, pipeline > 1) + 2
        a2a = moe_layers_per_stage * exchanges * buffer * (expert - 1) / expert
    microbatches = config.parallel.num_microbatches
    repeats = planned.parallel.pipeline_repeats if pipeline > 1 else 1
    per_stage = stage_flops_per_token(spec, config.data.seq_len, stages) if pipeline > 1 else []
    return Plan(
        mesh=mesh,
        layout=config.parallel.layout,
        params_bytes=param_bytes,
        grads_bytes=grad_bytes,
        optimizer_bytes=opt_bytes,
        all_to_all_bytes=a2a,
        exchange=exchange,
        tokens_per_device=tokens,
        stage_layers=stages,
        stage_flops_per_token=tuple(per_stage),
        microbatches=microbatches,
        pipeline_utilization=pipeline_utilization(per_stage, microbatches, repeats) if per_stage else 1.0,
        repeats=repeats,
        activations=activation_memory(
            planned,
            spec,
            mesh,
            layer_gradient_bytes=layer_grad_bytes,
            accumulated_gradient_bytes=split_layer_grad_bytes,
            platform=platform,
        ),
    )
