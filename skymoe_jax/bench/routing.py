"""`skymoe bench routing`: XLA against the Pallas kernels, stage by stage.

    skymoe bench routing [--small] [--tokens=T --width=D --experts=E --top_k=K] [--impls=xla,pallas]
                         [--dtype=bfloat16] [--repeats=N] [--ragged [--ffn=F]] [--json]

Times route, positions, dispatch and combine (each jitted alone, median of --repeats calls
after a warm-up) and their sum, and reports effective bandwidth: the bytes a stage must
move at least (each input read once, each output written once) over its time. Off a GPU
the Pallas kernels run in interpret mode, which measures the interpreter rather than the
kernels; the output says so. `--ragged` instead times the dropless expert FFN: the grouped
matmul over expert-sorted rows (experts.ragged: the CPU kernels in float32 on the CPU, the
Pallas kernel on a GPU, jax.lax.ragged_dot otherwise) against the batched matmul over slot
buffers with room for every token in every expert (moe.dropless_impl ragged vs padded).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from skymoe_jax.config import capacity
from skymoe_jax.kernels import common
from skymoe_jax.kernels.ops import XLA_OPS, RoutingOps, pallas_ops
from skymoe_jax.model.moe import dispatch, experts


class Shape(NamedTuple):
    tokens: int
    width: int
    experts: int
    top_k: int


SHAPES = (Shape(16384, 4096, 16, 2), Shape(32768, 2048, 64, 8))
# The same expert counts and k at 1/16 of the tokens and width: minutes, not hours, in interpret mode.
SMALL_SHAPES = (Shape(1024, 256, 16, 2), Shape(2048, 128, 64, 8))
STAGES = ("route", "positions", "dispatch", "combine")
CAPACITY_FACTOR = 1.25  # the config default (moe.capacity_factor)


def _median_seconds(fn: Callable, args: Sequence[Any], repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _stage_inputs(shape: Shape, dtype: jnp.dtype, seed: int = 0) -> dict[str, Any]:
    """Every stage's inputs, made once by the XLA path so both implementations see the same."""
    t, d, e, k = shape
    rng = np.random.default_rng(seed)
    z = jnp.asarray(rng.normal(size=(t, e)).astype(np.float32))
    r = XLA_OPS.route(z, k, gate_norm=True)
    cap = capacity(t, e, k, CAPACITY_FACTOR)
    slots = dispatch.slot_indices(r.experts, dispatch.expert_positions(r.experts, e).positions, cap)
    return {
        "z": z,
        "experts": r.experts,
        "weights": r.weights,
        "slots": slots,
        "num_slots": e * cap,
        "x": jnp.asarray(rng.normal(size=(t, d)), dtype),
        "y": jnp.asarray(rng.normal(size=(e * cap, d)), dtype),
        "kept": int(jnp.sum(slots >= 0)),
    }


def _stages(ops: RoutingOps, shape: Shape, inputs: dict[str, Any]) -> dict[str, tuple[Callable, tuple]]:
    k, e, num_slots = shape.top_k, shape.experts, inputs["num_slots"]
    return {
        "route": (jax.jit(lambda z: ops.route(z, k, gate_norm=True)), (inputs["z"],)),
        "positions": (jax.jit(lambda ex: ops.expert_positions(ex, e)), (inputs["experts"],)),
        "dispatch": (jax.jit(lambda x, s: ops.dispatch(x, s, num_slots)), (inputs["x"], inputs["slots"])),
        "combine": (jax.jit(ops.combine), (inputs["y"], inputs["slots"], inputs["weights"])),
    }


def _bytes(stage: str, shape: Shape, inputs: dict[str, Any], itemsize: int) -> int:
    """Least traffic of a stage: inputs read once, outputs written once (int32 indices, fp32 router)."""
    t, d, e, k = shape
    assignments = 4 * t * k
    return {
        "route": 4 * t * e * 3 + 2 * assignments,  # logits in; probs, normalized logits, weights, experts out
        "positions": 2 * assignments,  # experts in, positions out
        "dispatch": assignments + (inputs["kept"] + inputs["num_slots"]) * d * itemsize,  # kept rows in, slots out
        "combine": 2 * assignments + (inputs["kept"] + t) * d * itemsize,  # kept slots in, tokens out
    }[stage]


def routing_benchmark(
    shapes: Sequence[Shape], impls: Sequence[str], dtype: str = "bfloat16", repeats: int = 5
) -> list[dict[str, Any]]:
    """One row per (shape, impl, stage) and a `sum` row per (shape, impl): seconds per call and GB/s."""
    dt = jnp.dtype(dtype)
    available = {"xla": XLA_OPS, "pallas": pallas_ops()}
    rows = []
    for shape in shapes:
        inputs = _stage_inputs(shape, dt)
        for impl in impls:
            stages = _stages(available[impl], shape, inputs)
            total_s = total_bytes = 0
            for stage in STAGES:
                fn, args = stages[stage]
                seconds = _median_seconds(fn, args, repeats)
                moved = _bytes(stage, shape, inputs, dt.itemsize)
                rows.append(
                    {
                        **shape._asdict(),
                        "impl": impl,
                        "stage": stage,
                        "seconds": seconds,
                        "bytes": moved,
                        "gb_per_s": moved / seconds / 1e9,
                    }
                )
                total_s, total_bytes = total_s + seconds, total_bytes + moved
            rows.append(
                {
                    **shape._asdict(),
                    "impl": impl,
                    "stage": "sum",
                    "seconds": total_s,
                    "bytes": total_bytes,
                    "gb_per_s": total_bytes / total_s / 1e9,
                }
            )
    return rows


def ragged_benchmark(
    shapes: Sequence[Shape], ffn: int = 0, dtype: str = "bfloat16", repeats: int = 5
) -> list[dict[str, Any]]:
    """Dropless expert FFN: the grouped matmul over T*k sorted rows vs the batched matmul over [E, T, d] slots.

    ffn 0: half the width per expert (fine-grained experts, as in the shapes of the issue).
    """
    dt = jnp.dtype(dtype)
    rows = []
    for shape in shapes:
        t, d, e, k = shape
        f = ffn or d // 2
        rng = np.random.default_rng(0)
        w = experts.ExpertWeights(
            *(jnp.asarray(0.02 * rng.normal(size=s), dt) for s in ((e, d, f), (e, d, f), (e, f, d)))
        )
        r = XLA_OPS.route(jnp.asarray(rng.normal(size=(t, e)).astype(np.float32)), k, gate_norm=True)
        order = dispatch.sort_by_expert(r.experts, e)
        sorted_rows = jnp.asarray(rng.normal(size=(t * k, d)), dt)
        slots = jnp.asarray(rng.normal(size=(e, t, d)), dt)  # padded: every expert has room for all T tokens
        flops = 2 * 3 * d * f  # per row: gate, up and down projections
        for impl, fn, args, used_rows in (
            ("ragged", jax.jit(experts.ragged), (w, sorted_rows, order.group_sizes), t * k),
            ("padded", jax.jit(experts.batched), (w, slots), e * t),
        ):
            seconds = _median_seconds(fn, args, repeats)
            rows.append(
                {
                    **shape._asdict(),
                    "ffn": f,
                    "impl": impl,
                    "seconds": seconds,
                    "tflop_per_s": flops * used_rows / seconds / 1e12,
                    "useful_tflop_per_s": flops * t * k / seconds / 1e12,
                }
            )
    return rows


def _device_line(impls: Sequence[str]) -> str:
    device = jax.devices()[0]
    line = f"device: {device.device_kind} ({device.platform})"
    if "pallas" in impls and not common.on_gpu():
        line += (
            "; Pallas kernels run in INTERPRET mode here (no GPU): their times measure the interpreter, not the kernels"
        )
    return line


def _routing_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"{'tokens':>6} {'width':>5} {'E':>3} {'k':>2}  {'stage':<9} {'impl':<6} {'ms/call':>10} {'GB/s':>8}"
        f" {'vs xla':>7}"
    ]
    xla = {
        (r["tokens"], r["width"], r["experts"], r["top_k"], r["stage"]): r["seconds"]
        for r in rows
        if r["impl"] == "xla"
    }
    for r in rows:
        base = xla.get((r["tokens"], r["width"], r["experts"], r["top_k"], r["stage"]))
        speedup = f"{base / r['seconds']:6.2f}x" if base and r["impl"] != "xla" else ""
        lines.append(
            f"{r['tokens']:>6} {r['width']:>5} {r['experts']:>3} {r['top_k']:>2}  {r['stage']:<9} "
            f"{r['impl']:<6} {1e3 * r['seconds']:>10.3f} {r['gb_per_s']:>8.2f} {speedup:>7}"
        )
    return lines


def _ragged_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"{'tokens':>6} {'width':>5} {'ffn':>5} {'E':>3} {'k':>2}  {'impl':<10} {'ms/call':>10} "
        f"{'TFLOP/s':>8} {'useful':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r['tokens']:>6} {r['width']:>5} {r['ffn']:>5} {r['experts']:>3} {r['top_k']:>2}  "
            f"{r['impl']:<10} {1e3 * r['seconds']:>10.3f} {r['tflop_per_s']:>8.3f} "
            f"{r['useful_tflop_per_s']:>8.3f}"
        )
    return lines


def main(argv: Sequence[str]) -> int:
    from skymoe_jax.args import Args, Flag
    from skymoe_jax.errors import ConfigError

    args = Args(
        argv,
        "bench routing",
        "Time the routing stages (route, dispatch, combine) in XLA and as Pallas kernels, forward and backward; "
        "with --ragged, the dropless expert matmuls.",
        {
            "small": Flag(False, "the small shape table (quick, CPU-sized)"),
            "tokens": Flag(0, "one custom shape: tokens (with --width, --experts, --top_k)"),
            "width": Flag(0, "one custom shape: model width"),
            "experts": Flag(0, "one custom shape: experts"),
            "top_k": Flag(0, "one custom shape: experts per token"),
            "impls": Flag("xla,pallas", "implementations to time, comma-separated"),
            "dtype": Flag("bfloat16", "bfloat16 or float32"),
            "repeats": Flag(5, "timed repeats per case"),
            "ragged": Flag(False, "time the dropless expert matmuls (grouped against padded) instead"),
            "ffn": Flag(0, "expert FFN width for --ragged (0: 2 x width)"),
            "json": Flag(False, "print one JSON object"),
        },
    )
    custom = (args.tokens, args.width, args.experts, args.top_k)
    if any(custom) and not all(v > 0 for v in custom):
        raise ConfigError("--tokens, --width, --experts and --top_k go together (all positive), or use none")
    if any(custom) and not 1 <= args.top_k <= args.experts:
        raise ConfigError(f"--top_k={args.top_k} must be between 1 and --experts={args.experts}")
    shapes = (Shape(*custom),) if any(custom) else SMALL_SHAPES if args.small else SHAPES
    if args.dtype not in ("bfloat16", "float32"):
        raise ConfigError(f"--dtype={args.dtype!r} is not one of bfloat16, float32")
    if args.repeats < 1:
        raise ConfigError(f"--repeats={args.repeats} must be at least 1")
    if args.ragged:
        rows = ragged_benchmark(shapes, args.ffn, args.dtype, args.repeats)
        lines = [_device_line(()), *_ragged_table(rows)]
    else:
        impls = [i.strip() for i in args.impls.split(",") if i.strip()]
        unknown = [i for i in impls if i not in ("xla", "pallas")]
        if unknown or not impls:
            raise ConfigError(f"--impls={args.impls!r}: give xla, pallas or both, comma-separated")
        rows = routing_benchmark(shapes, impls, args.dtype, args.repeats)
        lines = [_device_line(impls), *_routing_table(rows)]
    if args.json:
        device = jax.devices()[0]
        print(
            json.dumps(
                {
                    "device": device.device_kind,
                    "platform": device.platform,
                    "pallas_interpreted": not common.on_gpu(),
                    "rows": rows,
                }
            )
        )
    else:
        print("\n".join(lines))
    return 0
