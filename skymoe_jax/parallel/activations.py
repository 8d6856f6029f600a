"""Activation memory of one train step on one device: what the backward pass keeps, and its working set.

What a layer keeps is not counted by hand: the planner traces the layer's own code (attention with its
norm, the MoE layer or dense FFN with theirs, the head with the loss) on abstract per-device shapes
and sums the residuals of its VJP, under the layer's rematerialization policy, so a change to the
model or to `model.remat` changes the plan with it. Per-device shapes: the batch rows a device holds
(data x expert in gshard, data in EDP, one microbatch when pipelined), attention heads, dense FFN width
and vocabulary split over the expert axis in EDP (tensor parallelism), MoE layers on their share of
tokens (all-to-all keeps a device's slot buffers the same size, so the unsharded layer is the
per-device one).

Terms, per device, without a pipeline:
- layers: each layer's residuals, plus its input (the scan's carry) and, unless all is recomputed, the input of
  its FFN half.
- head: final norm, float32 logits and cross-entropy residuals.
- backward: the working set of one layer's backward pass: under remat the layer's recomputed residuals,
  and with chunked attention its per-block float32 scores (scores, probabilities and their two
  cotangents, [rows, heads, block, block] each: a query block against a key block).
- reduction: the layer scan's backward writes each layer's gradients into a stacked accumulator and XLA moves
  their cross-device reduction into the loop, which writes a second stack (seen in the buffer assignment of the
  default config scanned: three [layers, experts, ...] all-reduced stacks beside the three accumulated ones). None
  on one device, where nothing is reduced, and none for unrolled layers, which have no loop.
With a pipeline (model/pipeline.py), whose schedule the terms follow:
- layers: the input of every tick (microbatches x chunks + stages - 1 of them), one microbatch's activation each.
- backward: one recomputed tick, its chunk's layers keeping what their policy keeps, and the larger working set of
  the two that follow it: the loss's (the head's residuals) or one layer's.
- pipeline: the one accumulator of the stage's weight gradients (split as the gradients are), the embedded batch
  every stage holds and, under FSDP, the stage's weights gathered once for the step.
- start: the first phase, embedding the batch next to the ticks' input stack; a peak of its own, not a term added
  to the others (`Activations.total` takes the larger).
- head and reduction: none (the loss is recomputed; the layers' gradients are reduced in the schedule).
Held against XLA:CPU's and XLA:GPU's buffer assignment, within 15% for every case in tests/test_plan.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from skymoe_jax.kernels import common, cpu_ffi
from skymoe_jax.model.attention import Attention, resolve_attention_impl
from skymoe_jax.model.chunked_attention import preferred_block
from skymoe_jax.model.layers import Head, RMSNorm, SwiGLU
from skymoe_jax.model.loss import cross_entropy
from skymoe_jax.model.mesh_layout import MeshLayout
from skymoe_jax.model.moe.block import expert_rows, moe_tokens
from skymoe_jax.model.moe.expert_parallel import Comm
from skymoe_jax.model.moe.experts import Experts
from skymoe_jax.model.spec import ModelSpec
from skymoe_jax.model.transformer import REMAT_POLICIES
from skymoe_jax.parallel.mesh import layout_rules, partition_spec

# The FlashAttention-style backward holds scores, probabilities and both their cotangents per key block.
CHUNKED_BACKWARD_BLOCKS = 4


@dataclasses.dataclass(frozen=True)
class Activations:
    layers: float
    head: float
    backward: float
    pipeline: float
    reduction: float
    start: float = 0.0  # a pipeline's first phase, when it embeds the batch: a peak of its own, not added

    @property
    def total(self) -> float:
        return max(self.layers + self.head + self.backward + self.pipeline + self.reduction, self.start)

    def terms(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def saved_bytes(
    fn: Callable, *args, remat: str = "none", fills: bool = False, axis_env: tuple[tuple[str, int], ...] = ()
) -> int:
    """Bytes of the residuals fn's VJP keeps for the backward pass under a remat policy, not counting
    fn's inputs (those are held anyway), nor scalars broadcast to a full shape (the fill of a masked
    select) unless `fills`: XLA fuses those into their users, except where a pipeline's tick loop
    copies every residual out of its cond. axis_env: (name, size) of the mesh axes fn's collectives name, which
    it is traced as one device of."""
    if remat != "none":
        fn = jax.checkpoint(fn, policy=REMAT_POLICIES[remat])
    jaxpr = jax.make_jaxpr(lambda *a: jax.vjp(fn, *a)[1], axis_env=list(axis_env))(*args).jaxpr
    inputs = {id(v) for v in jaxpr.invars}
    fused = set()
    if not fills:
        fused = {
            id(out)
            for eqn in jaxpr.eqns
            if eqn.primitive.name == "broadcast_in_dim" and not getattr(eqn.invars[0].aval, "shape", (1,))
            for out in eqn.outvars
        }
    kept = {id(v): v.aval for v in jaxpr.outvars if hasattr(v, "aval") and id(v) not in inputs | fused}
    return sum(math.prod(a.shape) * a.dtype.itemsize for a in kept.values())


def _abstract(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _tensor_parallel(state: nnx.State, spec: ModelSpec, layout: str, expert: int) -> nnx.State:
    """Parameters as one device uses them: dimensions the layout splits over the expert axis divided
    (FSDP's split over data is gathered before use, so it is not applied)."""
    rules = layout_rules(layout)
    local_heads = spec.num_heads // expert if spec.num_heads % expert == 0 else spec.num_heads

    def local(v):
        pspec = partition_spec(v.axes, v.shape, {"expert": expert}, rules)
        shape = [n // expert if axis == "expert" else n for n, axis in zip(v.shape, pspec)]
        if "kv_heads" in v.axes:  # grouped-query attention: each device keeps the KV heads its query heads read
            shape[v.axes.index("kv_heads")] = max(1, local_heads * spec.num_kv_heads // spec.num_heads)
        return v.replace(value=_abstract(shape, v.dtype))

    return jax.tree.map(local, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def activation_memory(
    config: ml_collections.ConfigDict,
    spec: ModelSpec,
    mesh: tuple[int, int, int],
    layer_gradient_bytes: float,
    accumulated_gradient_bytes: float,
    platform: str | None = None,
) -> Activations:
    """Per-device activation bytes of a train step of config on mesh (pipeline, data, expert), given the bytes of
    one device's gradients of its layer stack: whole (before a ZeRO-1 / FSDP split), and as the gradients are split
    (the pipeline accumulates them so). `platform` (default: this machine's) is where it runs, which decides what
    attention_impl=auto runs."""
    pipeline, data, expert = mesh
    seq = config.data.seq_len
    impl = resolve_attention_impl(spec.attention_impl, seq, platform, spec.compute_dtype)
    spec = dataclasses.replace(spec, attention_impl=impl)
    split = MeshLayout.from_config(config)
    edp = split.layout == "edp"
    microbatches = config.parallel.num_microbatches if split.pipelined else 1
    rows = config.data.batch_size // microbatches // (data if edp else data * expert)
    # What a layer keeps is a part that grows in proportion to its rows (every activation has a token dimension) and
    # a part that does not (a bf16 model's compute-dtype copies of its float32 weights), so it is traced on the
    # fewest rows that still fill whole routing groups and on twice those, and the line through both is read at
    # `rows`; the stage split and, in gshard, the expert axis (each device runs the whole layer on its tokens) do not
    # enter it.
    tp = expert if edp else 1
    group = spec.group_size or seq
    unit = next(
        r
        for r in range(1, rows + 1)
        if rows % r == 0 and r * seq % tp == 0 and (not spec.num_experts or r * seq // tp % group == 0)
    )
    traced_expert = expert if edp or spec.dropless else 1
    chunk = preferred_block(seq, platform)
    runs_on = platform or common.platform()
    scale = rows // unit

    def layer_bytes(spec: ModelSpec, pipelined: bool) -> _LayerBytes:
        one = _layer_bytes(spec, split.layout, unit, seq, traced_expert, chunk, runs_on, pipelined=pipelined)
        if scale == 1:
            return one
        two = _layer_bytes(spec, split.layout, 2 * unit, seq, traced_expert, chunk, runs_on, pipelined=pipelined)
        return jax.tree.map(lambda a, b: a + (scale - 1) * (b - a), one, two)

    if not split.pipelined:
        layer = layer_bytes(spec, pipelined=False)
        # The second stack comes from the layer loop's backward: unrolled layers (model.scan_layers=False without
        # remat, as configs/default.py runs) have no loop, and their gradients are reduced as they are made.
        looped = spec.scan_layers or spec.remat != "none"
        reduced = looped and (data > 1 or (expert > 1 and not edp))
        # Under full remat each layer is recomputed in the loop's backward, after the loss's has finished.
        recomputed = spec.remat == "full"
        return Activations(
            layers=sum(layer.kept[is_moe] for is_moe in spec.moe_layers),
            head=0.0 if recomputed else layer.head,
            backward=max(layer.backward, layer.head) if recomputed else layer.backward,
            pipeline=0.0,
            reduction=layer_gradient_bytes if reduced else 0.0,
        )
    # Pipelined (model/pipeline.py): the ticks keep their inputs, and every stage holds the embedded batch. One
    # tick at a time is recomputed, its chunk's layers keeping what their policy (parallel.stage_remat, the most of
    # any stage) keeps; then the loss is recomputed (the head's working set) and each layer in turn (a layer's). The
    # stage's gradients build up in one accumulator, split as the gradients are.
    policies = set(config.parallel.stage_remat) or {spec.remat}
    longest = max(split.stage_layers)
    per_tick = 0.0
    working = 0.0
    for policy in policies:
        layer = layer_bytes(dataclasses.replace(spec, remat=policy), pipelined=True)
        kept = [layer.kept[is_moe] for is_moe in spec.moe_layers[:longest]]
        per_tick = max(per_tick, sum(kept))
        if policy == "full":
            # Each layer is recomputed inside its own cond in its backward (model/pipeline.py), after the loss's.
            working = max(working, layer.backward, layer.head)
        elif longest > 1:
            # A layer's residuals come out of its cond stacked over the chunk; its backward takes them as the
            # operands of the transposed cond: a slice of the stack and XLA's copy of it. The loss's backward
            # comes first, on its own.
            working = max(working, layer.backward + 2 * max(kept), layer.head)
        else:
            # A one-layer chunk has no layer loop: XLA schedules the layer's recomputation beside the loss's.
            working = max(working, layer.backward + layer.head)
    ticks = microbatches * split.repeats + pipeline - 1
    x_bytes = rows * seq * spec.d_model * spec.compute_dtype.itemsize
    # Under FSDP XLA gathers the stage's weights once, before the tick loop, and holds them for the step.
    gathered = layer_gradient_bytes if config.parallel.fsdp else 0.0
    # Embedding the batch: the lookup's result, its float32 copy into the pipeline region and, where the
    # vocabulary is split (EDP), the sum of the partial lookups, next to the ticks' (empty) input stack.
    embedding = (3 if edp else 2) * microbatches * rows * seq * spec.d_model * 4
    return Activations(
        layers=ticks * x_bytes,
        head=0.0,
        backward=per_tick + working,
        pipeline=accumulated_gradient_bytes + microbatches * x_bytes + gathered,
        reduction=0.0,
        start=ticks * x_bytes + embedding + gathered,
    )


class _LayerBytes(NamedTuple):
    kept: dict[bool, float]  # per layer (MoE or dense): what the backward keeps
    head: float
    backward: float


@functools.lru_cache(maxsize=256)
def _layer_bytes(
    spec: ModelSpec, layout: str, rows: int, seq: int, expert: int, chunk: int, platform: str, *, pipelined: bool
) -> _LayerBytes:
    """What one device's layers keep, traced from the model on rows x seq tokens as it runs on `platform` (which
    picks the experts' kernels); `chunk` is the block of chunked attention there."""
    with common.traced_for(platform):
        return _traced_layer_bytes(spec, layout, rows, seq, expert, chunk, pipelined=pipelined)


def _traced_layer_bytes(
    spec: ModelSpec, layout: str, rows: int, seq: int, expert: int, chunk: int, *, pipelined: bool
) -> _LayerBytes:
    edp = layout == "edp"
    dtype = spec.compute_dtype
    x = _abstract((rows, seq, spec.d_model), dtype)
    ints = _abstract((rows, seq), jnp.int32)
    x_bytes = math.prod(x.shape) * dtype.itemsize

    def split(build):
        graphdef, state = nnx.split(nnx.eval_shape(build))
        return graphdef, _tensor_parallel(state, spec, layout, expert if edp else 1)

    attn_def, attn_state = split(lambda: (RMSNorm(spec), Attention(spec, nnx.Rngs(0), layout)))

    def attention(state, x, positions, segment_ids):
        norm, attn = nnx.merge(attn_def, state)
        return attn(norm(x), positions, segment_ids)

    # name: (function, abstract arguments, the mesh axes its collectives name)
    halves = {"attention": (attention, (attn_state, x, ints, ints), ())}
    if spec.num_experts:
        moe_def, moe_state = nnx.split(nnx.eval_shape(lambda: (RMSNorm(spec), Experts(spec, nnx.Rngs(0)))))
        # Under an expert axis the dropless layer is traced as one device of it: what it keeps depends on the size
        # of its receive buffer (model/moe/ragged_exchange.py).
        exchanged = spec.dropless and expert > 1
        if exchanged:
            moe_state = _tensor_parallel(moe_state, spec, layout, expert)
        tokens = _abstract((rows * seq // (expert if edp else 1), spec.d_model), dtype)
        gate = _abstract((spec.d_model, spec.num_experts), jnp.float32)

        def moe(state, gate, tokens):
            norm, experts = nnx.merge(moe_def, state)
            # An EDP share may cut rows; the per-row statistics are a few floats whatever rows they take.
            rows_of = math.gcd(tokens.shape[0], seq)
            return moe_tokens(
                norm(tokens),
                gate,
                experts.weights(),
                spec,
                train=True,
                group=spec.group_size or seq,
                seq_len=rows_of,
                comm=Comm(expert_axis="expert") if exchanged else Comm(),
            )

        halves["moe"] = (moe, (moe_state, gate, tokens), (("expert", expert),) if exchanged else ())
    if spec.num_layers > spec.num_moe_layers:
        dense_def, dense_state = split(lambda: (RMSNorm(spec), SwiGLU(spec, spec.ffn_dim, nnx.Rngs(0))))

        def dense(state, x):
            norm, ffn = nnx.merge(dense_def, state)
            return ffn(norm(x))

        halves["dense"] = (dense, (dense_state, x), ())

    def saved(remat: str) -> dict[str, float]:
        out = {
            name: saved_bytes(fn, *args, remat=remat, fills=pipelined, axis_env=axes)
            for name, (fn, args, axes) in halves.items()
        }
        if spec.attention_impl == "xla" and remat == "none":
            # The traced backward keeps the masked scores, their exponent and the probabilities, [rows, heads, S, S]
            # each; XLA (CPU and GPU alike) recomputes one of the three in a fusion and stores two.
            out["attention"] -= rows * spec.num_heads // (expert if edp else 1) * seq * seq * 4
        return out

    def per_layer(halves_saved: dict[str, float], remat: str) -> dict[bool, float]:
        # The layer input is the scan's carry, kept per layer; unless all is recomputed, the FFN half's input too
        # (under `dots` the compiled programs kept it rather than add the attention output again).
        inputs = x_bytes * (1 if remat == "full" else 2)
        return {
            is_moe: inputs
            + (0.0 if remat == "full" else halves_saved["attention"] + halves_saved["moe" if is_moe else "dense"])
            for is_moe in set(spec.moe_layers)
        }

    kept = per_layer(saved(spec.remat), spec.remat)

    head_def, head_state = split(lambda: (RMSNorm(spec), Head(spec, nnx.Rngs(0))))

    def head(state, x, targets, loss_mask):
        norm, out = nnx.merge(head_def, state)
        return cross_entropy(out(norm(x)), {"targets": targets, "loss_mask": loss_mask})[0]

    head_bytes = saved_bytes(head, head_state, x, ints, _abstract((rows, seq), jnp.float32))

    # The backward of a layer runs its FFN half, then its attention half: under remat the whole layer's
    # residuals are recomputed first; chunked attention's blocks exist only in the second phase. The experts'
    # backward makes h, d_gate and d_up [slots, f] for the weight gradients, and dx, all at once; the CPU kernel
    # sums the weight gradients block by block, and of those makes only dx.
    recomputed = dict.fromkeys(halves, 0.0)
    if spec.remat != "none":
        # What the forward kept (dots' outputs under `dots`) is not made again.
        kept_halves = saved(spec.remat)
        recomputed = {name: b - kept_halves[name] for name, b in saved("none").items()}
    blocks = 0.0
    if spec.attention_impl == "chunked":
        heads = spec.num_heads // expert if edp and spec.num_heads % expert == 0 else spec.num_heads
        blocks = CHUNKED_BACKWARD_BLOCKS * rows * heads * chunk * chunk * 4
    on_kernels = common.platform() == "cpu" and cpu_ffi.usable(x)
    experts_backward = 0.0
    if spec.num_experts:
        slots = expert_rows(spec, rows * seq // (expert if edp else 1), spec.group_size or seq, expert)
        experts_backward = slots * (spec.d_model + (0 if on_kernels else 3 * spec.expert_ffn_dim)) * dtype.itemsize
    layer_recomputed = max(per_layer(recomputed, "none").values()) if spec.remat != "none" else 0.0
    if pipelined and on_kernels:
        # The CPU kernels' backward of the experts ran beside the recomputed layer in the compiled pipelines.
        layer_recomputed += experts_backward
    backward = max(layer_recomputed, recomputed["attention"] + blocks, experts_backward)
    return _LayerBytes(kept=kept, head=head_bytes, backward=backward)
