"""The mesh search behind `skymoe plan`: every way to lay a config out on N devices that fits a device's
memory, ranked by a stated step-time model. It answers from the model in seconds; the memory side is
the planner's (parallel/plan.py, checked against the compiler in tests/test_plan.py).

Enumerated: meshes pipeline x data x expert over the devices (pipeline at most the layer count, expert
dividing the experts), both layouts, neither / ZeRO-1 / FSDP, model.remat none / dots / full, and for a
pipeline its microbatches (divisors of the rows a data replica holds, at most MAX_MICROBATCHES), its schedule
(GPipe, or circular with R = 2, 3 or 4 chunks per device where the layers and microbatches allow it) and two
splits of its (virtual) stages: even (earlier stages take the remainder) and balanced (the split whose slowest
stage, head included, is fastest; the paper's non-uniform split).

Step-time model, per step, with no overlap between its parts (so it is a bound that overlap shortens):
- compute: the slowest (virtual) stage's training FLOPs for the tokens of one device, at `mfu` x the device's
  peak, times (M R + P - 1) / M for the bubble (R = 1: GPipe); each forward pass beyond the first (full remat;
  a pipeline's recomputed ticks, plan.forward_passes) adds a third of a pass, dots recomputes only cheap
  non-matmul work (not counted).
- pipeline sends: each tick sends one microbatch's activations to the next device and, in the backward, their
  gradient back: 2 (M R + P - 1) sends, at NVLink speed when neighbouring stages share a node.
- all-to-all: the planner's bytes sent per device over the expert axis.
- tensor parallelism (EDP): attention's output projection is all-reduced over the expert axis, once in
  the forward and once in the backward per layer (twice more under full remat): 2 (E - 1) / E x the
  layer's activations each time.
- gradients: a ring all-reduce of each device's gradients over the devices that replicate them (data,
  x expert in gshard): 2 (R - 1) / R x the parameter bytes (ZeRO-1's reduce-scatter and all-gather
  move the same bytes); FSDP gathers the parameters again in the forward and backward (+ 2 (R - 1) / R).
A collective runs at the NVLink bandwidth when its group fits in a node (the mesh is laid out with the
expert axis fastest, then data, then pipeline) and at the per-GPU network bandwidth otherwise.
Not counted: XLA reduces the gradients of a pipelined step's layers once per microbatch inside the schedule, not
once per step (model/pipeline.py leaves the data axis to XLA).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import ml_collections

from skymoe_jax.errors import ConfigError
from skymoe_jax.metrics.flops import stage_flops_per_token
from skymoe_jax.model.mesh_layout import pipeline_stage_layers
from skymoe_jax.model.spec import ModelSpec
from skymoe_jax.parallel.devices import Device
from skymoe_jax.parallel.plan import Plan, forward_passes, plan

MAX_MICROBATCHES = 64
MAX_REPEATS = 4
REMATS = ("none", "dots", "full")
OPTIMIZER_SPLITS = ("none", "zero1", "fsdp")


@dataclasses.dataclass(frozen=True)
class StepTime:
    compute: float  # seconds, bubble included
    all_to_all: float
    tensor_parallel: float
    gradients: float
    pipeline: float = 0.0  # sends between stages

    @property
    def total(self) -> float:
        return self.compute + self.all_to_all + self.tensor_parallel + self.gradients + self.pipeline


@dataclasses.dataclass(frozen=True)
class Candidate:
    fits: bool
    layout: str
    optimizer_split: str  # none | zero1 | fsdp
    remat: str
    plan: Plan
    step: StepTime
    tokens_per_sec_per_device: float

    @property
    def key(self) -> tuple:
        """What a user sets: mesh, layout, ZeRO-1 / FSDP, remat, microbatches, stage split."""
        return (
            self.plan.mesh,
            self.layout,
            self.optimizer_split,
            self.remat,
            self.plan.microbatches,
            self.plan.stage_layers,
            self.plan.repeats,
        )

    def describe(self) -> str:
        p = self.plan
        chunks = f" in {p.repeats} chunks per device" if p.repeats > 1 else ""
        split = "" if p.mesh[0] == 1 else f" stages {_runs(p.stage_layers)}{chunks}, {p.microbatches} microbatches"
        return f"{'x'.join(map(str, p.mesh))} {self.layout} {self.optimizer_split} remat={self.remat}{split}"


def layout_key(config: ml_collections.ConfigDict) -> tuple:
    """A config's own layout as a Candidate.key."""
    p = config.parallel
    pipelined = p.mesh[0] > 1
    return (
        tuple(p.mesh),
        p.layout,
        "fsdp" if p.fsdp else "zero1" if p.zero1 else "none",
        config.model.remat,
        p.num_microbatches if pipelined else 1,
        pipeline_stage_layers(config) if pipelined else (config.model.num_layers,),
        p.pipeline_repeats if pipelined else 1,
    )


@dataclasses.dataclass(frozen=True)
class SearchResult:
    candidates: list[Candidate]  # every layout the config can run, fitting or not, fastest first
    refused: int  # layouts the config cannot run (batch or experts do not divide, ...)
    usable_bytes: float

    @property
    def fitting(self) -> list[Candidate]:
        return [c for c in self.candidates if c.fits]


def _runs(split: tuple[int, ...]) -> str:
    """(5, 5, 5, 5, 4, 4) -> '4x5+2x4': how many stages take how many layers."""
    return "+".join(f"{len(list(group))}x{n}" for n, group in itertools.groupby(split))


def balanced_split(spec: ModelSpec, seq_len: int, stages: int) -> tuple[int, ...]:
    """The stage split with the fastest slowest stage, the last stage (which runs the head) taking no
    more layers than the others, and the rest as even as possible (earlier stages take the remainder).
    Of equally fast splits, the one with the most layers on the last stage (the most even)."""
    best = None
    for last in range(math.ceil(spec.num_layers / stages), 0, -1):
        rest = spec.num_layers - last
        if rest < stages - 1:
            continue
        base, extra = divmod(rest, stages - 1)
        split = tuple(base + (i < extra) for i in range(stages - 1)) + (last,)
        if last > split[0]:
            continue
        cost = max(stage_flops_per_token(spec, seq_len, split))
        if best is None or cost < best[0]:
            best = (cost, split)
    return best[1] if best else ()


def _link(group: int, faster: int, device: Device) -> float:
    """Bandwidth of a collective over `group` devices strided by `faster` (the product of faster axes)."""
    return device.intra_node if group * faster <= device.per_node else device.inter_node


def step_time(config: ml_collections.ConfigDict, p: Plan, device: Device, mfu: float) -> StepTime:
    pipeline, data, expert = p.mesh
    spec = ModelSpec.from_config(config)
    seq = config.data.seq_len
    stage_flops = p.stage_flops_per_token or stage_flops_per_token(spec, seq, (spec.num_layers,))
    # A forward pass is a third of a step's FLOPs (the backward two thirds); each recomputation adds one.
    recompute = (forward_passes(config.model.remat, pipeline > 1) + 2) / 3
    m = p.microbatches if pipeline > 1 else 1
    ticks = m * p.repeats + pipeline - 1
    compute = ticks / m * max(stage_flops) * p.tokens_per_device * recompute / (mfu * device.peak_flops)
    a2a = p.all_to_all_bytes / _link(expert, 1, device) if expert > 1 else 0.0
    tp = 0.0
    if config.parallel.layout == "edp" and expert > 1:
        # The layer's activations on a device: its data replica's tokens (replicated over expert).
        activations = p.tokens_per_device * expert * spec.d_model * spec.compute_dtype.itemsize
        reduces = 2 * forward_passes(config.model.remat, pipeline > 1) * max(p.stage_layers) * p.repeats
        tp = reduces * 2 * (expert - 1) / expert * activations / _link(expert, 1, device)
    replicas = data * (expert if config.parallel.layout == "gshard" else 1)
    gradients = 0.0
    if replicas > 1:
        whole = p.params_bytes * (data if config.parallel.fsdp else 1)  # FSDP's params are split over data
        passes = 4 if config.parallel.fsdp else 2
        faster = 1 if config.parallel.layout == "gshard" else expert
        gradients = passes * (replicas - 1) / replicas * whole / _link(replicas, faster, device)
    sends = 0.0
    if pipeline > 1:
        # One microbatch's activations on a device (in EDP replicated over the expert axis).
        rows_tokens = p.tokens_per_device * (expert if config.parallel.layout == "edp" else 1) / m
        sent = rows_tokens * spec.d_model * spec.compute_dtype.itemsize
        sends = 2 * ticks * sent / _link(2, data * expert, device)
    return StepTime(compute=compute, all_to_all=a2a, tensor_parallel=tp, gradients=gradients, pipeline=sends)


def _meshes(num_devices: int, spec: ModelSpec):
    for pipeline in range(1, min(spec.num_layers, num_devices) + 1):
        if num_devices % pipeline:
            continue
        for expert in range(1, num_devices // pipeline + 1):
            if num_devices // pipeline % expert or (spec.num_experts and spec.num_experts % expert):
                continue
            if not spec.num_experts and expert > 1:
                continue
            yield pipeline, num_devices // pipeline // expert, expert


def _even_split(config: ml_collections.ConfigDict, stages: int) -> tuple[int, ...]:
    """The even split of the layers over `stages` (virtual) stages."""
    even = config.copy_and_resolve_references()
    even.parallel.update(mesh=(stages, 1, 1), pipeline_stage_layers=(), pipeline_repeats=1)
    return pipeline_stage_layers(even)


def _divisors(n: int, most: int) -> list[int]:
    return [d for d in range(1, min(n, most) + 1) if n % d == 0]


def search(
    config: ml_collections.ConfigDict,
    num_devices: int,
    device: Device,
    *,
    mfu: float = 0.4,
    memory_fraction: float = 0.9,
) -> SearchResult:
    """Every layout of config on num_devices, fastest first by the module's step-time model, each marked
    whether its planned peak fits memory_fraction of the device's memory."""
    spec = ModelSpec.from_config(config)
    usable = memory_fraction * device.memory
    candidates, refused = [], 0
    for (pipeline, data, expert), layout, split_opt, remat in itertools.product(
        _meshes(num_devices, spec), ("gshard", "edp"), OPTIMIZER_SPLITS, REMATS
    ):
        if layout == "edp" and expert == 1 and data > 1:
            continue  # the same program as gshard
        rows = config.data.batch_size // (data if layout == "edp" else data * expert)
        schedules = [((), 1, 1)]  # (split, microbatches, repeats); () = the even split
        if pipeline > 1:
            schedules = []
            for repeats in range(1, MAX_REPEATS + 1):
                if pipeline * repeats > spec.num_layers:
                    break
                splits = [()]
                balanced = balanced_split(spec, config.data.seq_len, pipeline * repeats)
                splits += [balanced] if balanced and balanced != _even_split(config, pipeline * repeats) else []
                for m in _divisors(max(rows, 1), MAX_MICROBATCHES):
                    if repeats == 1 or m >= pipeline:
                        schedules += [(split, m, repeats) for split in splits]
        for split, m, repeats in schedules:
            candidate_config = config.copy_and_resolve_references()
            candidate_config.model.remat = remat
            candidate_config.parallel.update(
                mesh=(pipeline, data, expert),
                layout=layout,
                zero1=split_opt == "zero1",
                fsdp=split_opt == "fsdp",
                num_microbatches=m,
                pipeline_stage_layers=split,
                pipeline_repeats=repeats,
                stage_remat=(),
            )
            try:
                p = plan(candidate_config, (pipeline, data, expert), platform="gpu")  # validates
            except ConfigError:
                refused += 1
                continue
            step = step_time(candidate_config, p, device, mfu)
            tokens = config.data.batch_size * config.data.seq_len
            candidates.append(
                Candidate(
                    fits=p.peak_bytes <= usable,
                    layout=layout,
                    optimizer_split=split_opt,
                    remat=remat,
                    plan=p,
                    step=step,
                    tokens_per_sec_per_device=tokens / step.total / num_devices,
                )
            )
    candidates.sort(key=lambda c: c.step.total)
    return SearchResult(candidates=candidates, refused=refused, usable_bytes=usable)
