"""Every Pallas routing kernel against its XLA twin, the flash attention kernel against dense attention, and the
dropless experts' grouped matmul against jax.lax.ragged_dot, forward and backward, as `skymoe acceptance` runs them.

On a GPU the kernels are compiled (through Triton, which their compiler params select) and
compared with the twins compiled for the same GPU; the program lowered for the GPU is searched
for the Triton calls, so a silent fallback could not pass. Off a GPU the kernels can only be
interpreted: the comparison then checks their semantics, and their lowering for CUDA is searched
for the same Triton calls instead. Indices and counts must be equal; float outputs and gradients
within TOLERANCE of each array's largest magnitude (the kernels reduce in another order than
XLA, a few float32 ulps; a wrong row or a missed term is O(1)).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from skymoe_jax.config import capacity
from skymoe_jax.kernels import common
from skymoe_jax.kernels.attention import pallas_attention
from skymoe_jax.kernels.combine import combine
from skymoe_jax.kernels.dispatch import dispatch as dispatch_kernel
from skymoe_jax.kernels.grouped_matmul import grouped_matmul
from skymoe_jax.kernels.positions import expert_positions
from skymoe_jax.kernels.route import route
from skymoe_jax.model.attention import attention_mask
from skymoe_jax.model.moe import dispatch, router

TOLERANCE = 1e-5
TRITON_CALL = "__gpu$xla.gpu.triton"
# Every pallas_call of the four stages, forward and backward.
KERNELS = (
    "skymoe_route",
    "skymoe_route_bwd",
    "skymoe_expert_counts",
    "skymoe_expert_ranks",
    "skymoe_slot_sources",
    "skymoe_gather_rows",
    "skymoe_gather_sum",
    "skymoe_gather_dot",
)


# Flash attention (model.attention_impl=pallas) against jax.nn.dot_product_attention: Triton's float32 dots
# run in TF32 on the GPU (10-bit mantissa) where XLA's reference may not, so the bound is looser than the
# routing kernels'; a wrong mask or a missed key block is an O(1) error.
ATTENTION_TOLERANCE = 2e-2
ATTENTION_KERNELS = ("mha_forward", "mha_backward", "mha_preprocess_backward")


class AttentionCase(NamedTuple):
    batch: int
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int


ATTENTION_GPU_CASE = AttentionCase(2, 2048, 8, 2, 128)
ATTENTION_CPU_CASE = AttentionCase(1, 32, 2, 1, 16)  # two tiles of 16, interpreted in seconds


# The grouped matmul against jax.lax.ragged_dot in float32: the kernel's dots are IEEE float32, XLA's may run in TF32
# on the GPU, so attention's bound; a wrong group or a missed row tile is an O(1) error.
GROUPED_MATMUL_TOLERANCE = ATTENTION_TOLERANCE
GROUPED_MATMUL_KERNELS = ("skymoe_grouped_matmul", "skymoe_grouped_matmul_t", "skymoe_grouped_matmul_dw")


class GroupedCase(NamedTuple):
    rows: int  # sorted rows, of which the groups hold 7/8 (the rest come out zero)
    width: int
    ffn: int
    experts: int


GROUPED_GPU_CASE = GroupedCase(32768, 1024, 2048, 16)  # one gpu_medium layer's 16,384 tokens, top-2
GROUPED_CPU_CASE = GroupedCase(200, 24, 40, 6)  # several 128-row tiles that straddle groups, interpreted


class Case(NamedTuple):
    tokens: int
    experts: int
    top_k: int
    width: int
    capacity_factor: float


# The bench shapes' expert counts and k; the widths are not powers of two and some assignments drop.
GPU_CASES = (Case(16384, 16, 2, 4096, 1.25), Case(32768, 64, 8, 2048, 1.25), Case(777, 64, 4, 300, 0.9))
# Three route blocks (the last holds 2 tokens), a width that is no power of two, dropped assignments and
# empty slots; small enough to interpret in seconds (tests/test_kernels.py covers more edges on the CPU).
CPU_CASES = (Case(130, 64, 8, 40, 0.9),)


def check_kernels(cases: tuple[Case, ...]) -> dict[str, Any]:
    """{'compiled', 'triton_kernels', 'rows': one per (case, stage, direction), 'passed'}."""
    compiled = common.on_gpu()
    rows = [row for case in cases for row in _compare(case, interpret=not compiled)]
    found = _triton_kernels(cases[0], lowered_only=not compiled)
    missing = sorted(set(KERNELS) - set(found))
    return {
        "compiled": compiled,
        "triton_kernels": found,
        "missing_kernels": missing,
        "rows": rows,
        "passed": all(r["passed"] for r in rows) and not missing,
    }


def _inputs(case: Case, seed: int = 0) -> dict[str, jax.Array]:
    t, e, k, d, cf = case
    rng = np.random.default_rng(seed)
    chosen = jnp.asarray(np.argsort(rng.random((t, e)), axis=1)[:, :k].astype(np.int32))
    num_slots = e * capacity(t, e, k, cf)
    slots = dispatch.slot_indices(chosen, dispatch.expert_positions(chosen, e).positions, num_slots // e)

    def f32(*shape):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32))

    return {
        "z": f32(t, e),
        "chosen": chosen,
        "slots": slots,
        "num_slots": num_slots,
        "x": f32(t, d),
        "y": f32(num_slots, d),
        "weights": jnp.asarray(rng.random((t, k)).astype(np.float32)),
        "d_probs": f32(t, e),
        "d_weights": f32(t, k),
        "d_logits": f32(t, e),
        "d_slots": f32(num_slots, d),
        "d_tokens": f32(t, d),
    }


def _stage_fns(case: Case, a: dict, interpret: bool) -> dict[str, tuple[Callable, Callable, tuple]]:
    """stage -> (kernel fn, twin fn, args); each fn returns (outputs, gradients or None)."""
    k, e, num_slots = case.top_k, case.experts, a["num_slots"]
    opts = dict(gate_norm=True, ddof=1, lam=2.0)

    def routed(fn):
        def loss(z):
            r = fn(z, k, **opts)
            return (
                jnp.sum(r.probs * a["d_probs"])
                + jnp.sum(r.weights * a["d_weights"])
                + jnp.sum(r.logits * a["d_logits"])
            ), r

        def run(z):
            (_, r), grad = jax.value_and_grad(loss, has_aux=True)(z)
            return {"experts": r.experts, "probs": r.probs, "weights": r.weights, "logits": r.logits}, {"d_z": grad}

        return run

    def positioned(fn):
        return lambda chosen: (dict(zip(("positions", "counts"), fn(chosen, e))), None)

    def dispatched(fn):
        def run(x, slots):
            out, vjp = jax.vjp(lambda x: fn(x, slots, num_slots), x)
            return {"slots": out}, {"d_x": vjp(a["d_slots"])[0]}

        return run

    def combined(fn):
        def run(y, slots, w):
            out, vjp = jax.vjp(lambda y, w: fn(y, slots, w), y, w)
            d_y, d_w = vjp(a["d_tokens"])
            return {"tokens": out}, {"d_y": d_y, "d_weights": d_w}

        return run

    kernel = dict(interpret=interpret)
    return {
        "route": (routed(lambda z, k, **o: route(z, k, **o, **kernel)), routed(router.route), (a["z"],)),
        "positions": (
            positioned(lambda c, n: expert_positions(c, n, **kernel)),
            positioned(dispatch.expert_positions),
            (a["chosen"],),
        ),
        "dispatch": (
            dispatched(lambda x, s, n: dispatch_kernel(x, s, n, **kernel)),
            dispatched(dispatch.dispatch),
            (a["x"], a["slots"]),
        ),
        "combine": (
            combined(lambda y, s, w: combine(y, s, w, **kernel)),
            combined(dispatch.combine),
            (a["y"], a["slots"], a["weights"]),
        ),
    }


def _compare(case: Case, interpret: bool) -> list[dict[str, Any]]:
    a = _inputs(case)
    rows = []
    for stage, (kernel_fn, twin_fn, args) in _stage_fns(case, a, interpret).items():
        (out, grads), (twin_out, twin_grads) = jax.jit(kernel_fn)(*args), jax.jit(twin_fn)(*args)
        for direction, got, want in (("forward", out, twin_out), ("backward", grads, twin_grads)):
            if want is None:
                continue  # integer outputs: nothing to differentiate
            rows.append({**case._asdict(), "stage": stage, "direction": direction, **_difference(got, want)})
    return rows


def _difference(got: dict[str, jax.Array], want: dict[str, jax.Array], tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Largest error relative to each array's largest magnitude; integer arrays must match exactly."""
    worst, passed = 0.0, True
    for name, expected in want.items():
        g, w = np.asarray(got[name], np.float64), np.asarray(expected, np.float64)
        if g.shape != w.shape:
            return {"max_rel_error": float("inf"), "passed": False, "note": f"{name}: shape {g.shape} != {w.shape}"}
        error = float(np.max(np.abs(g - w), initial=0.0)) / max(1.0, float(np.max(np.abs(w), initial=0.0)))
        exact = np.issubdtype(np.asarray(expected).dtype, np.integer)
        passed &= error == 0.0 if exact else error <= tolerance
        worst = max(worst, error)
    return {"max_rel_error": worst, "tolerance": tolerance, "passed": bool(passed)}


def triton_calls(text: str) -> list[str]:
    """Names of the Triton kernels a lowered (StableHLO) program calls, sorted, each once."""
    return sorted({chunk.split('name = "', 1)[1].split('"', 1)[0] for chunk in text.split(TRITON_CALL)[1:]})


def _triton_kernels(case: Case, lowered_only: bool) -> list[str]:
    """Names of the Triton calls in all four stages, forward and backward, compiled (interpret=False)."""
    a = _inputs(case)
    fns = _stage_fns(case, a, interpret=False)

    def everything(z, chosen, x, y, slots, w):
        return (
            fns["route"][0](z),
            fns["positions"][0](chosen),
            fns["dispatch"][0](x, slots),
            fns["combine"][0](y, slots, w),
        )

    traced = jax.jit(everything).trace(a["z"], a["chosen"], a["x"], a["y"], a["slots"], a["weights"])
    text = traced.lower(lowering_platforms=("cuda",)).as_text() if lowered_only else traced.lower().as_text()
    return triton_calls(text)


def check_attention(case: AttentionCase) -> dict[str, Any]:
    """Flash attention against dense attention on packed rows (values, and gradients of q, k, v), and the
    Triton calls of its forward and backward: {'rows', 'triton_kernels', 'missing_kernels', 'passed'}."""
    compiled = common.on_gpu()
    b, s, h, kv, d = case
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, s, n, d)).astype(np.float32)) for n in (h, kv, kv))
    segments = jnp.asarray(np.sort(rng.integers(0, 4, (b, s)), axis=1).astype(np.int32))  # packed documents
    d_out = jnp.asarray(rng.normal(size=(b, s, h, d)).astype(np.float32))

    def run(attend):
        def both(q, k, v, segments):
            out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, segments), q, k, v)
            return {"out": out}, dict(zip(("d_q", "d_k", "d_v"), vjp(d_out)))

        return both

    flash = run(lambda q, k, v, seg: pallas_attention(q, k, v, seg, "gshard", interpret=not compiled))
    dense = run(lambda q, k, v, seg: jax.nn.dot_product_attention(q, k, v, mask=attention_mask(seg)))
    (out, grads), (want_out, want_grads) = jax.jit(flash)(q, k, v, segments), jax.jit(dense)(q, k, v, segments)
    rows = [
        {**case._asdict(), "stage": "attention", "direction": direction, **_difference(got, want, ATTENTION_TOLERANCE)}
        for direction, got, want in (("forward", out, want_out), ("backward", grads, want_grads))
    ]
    compiled_flash = run(lambda q, k, v, seg: pallas_attention(q, k, v, seg, "gshard", interpret=False))
    return _checked(rows, compiled_flash, (q, k, v, segments), ATTENTION_KERNELS)


def check_grouped_matmul(case: GroupedCase) -> dict[str, Any]:
    """The grouped matmul against jax.lax.ragged_dot on rows sorted into groups of random sizes (one empty, and
    rows past the last group): values, and gradients of x and w. Same keys as check_attention."""
    rows, d, f, e = case
    rng = np.random.default_rng(0)
    share = rng.dirichlet(np.ones(e))
    share[1] = 0.0  # an expert no row goes to
    group_sizes = jnp.asarray(rng.multinomial(rows * 7 // 8, share / share.sum()).astype(np.int32))
    x = jnp.asarray(rng.normal(size=(rows, d)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(e, d, f)).astype(np.float32) / np.sqrt(d))
    dy = jnp.asarray(rng.normal(size=(rows, f)).astype(np.float32))

    def run(matmul):
        def both(x, w, group_sizes):
            out, vjp = jax.vjp(lambda x, w: matmul(x, w, group_sizes), x, w)
            return {"out": out}, dict(zip(("d_x", "d_w"), vjp(dy)))

        return both

    kernel = run(lambda x, w, g: grouped_matmul(x, w, g, interpret=not common.on_gpu()))
    (out, grads), (want_out, want_grads) = (
        jax.jit(kernel)(x, w, group_sizes),
        jax.jit(run(jax.lax.ragged_dot))(x, w, group_sizes),
    )
    checked = [
        {
            **case._asdict(),
            "stage": "grouped_matmul",
            "direction": direction,
            **_difference(got, want, GROUPED_MATMUL_TOLERANCE),
        }
        for direction, got, want in (("forward", out, want_out), ("backward", grads, want_grads))
    ]
    compiled = run(lambda x, w, g: grouped_matmul(x, w, g, interpret=False))
    return _checked(checked, compiled, (x, w, group_sizes), GROUPED_MATMUL_KERNELS)


def _checked(
    rows: list[dict[str, Any]], compiled_fn: Callable, args: tuple, kernels: tuple[str, ...]
) -> dict[str, Any]:
    """The comparisons' rows with the Triton calls of compiled_fn(*args) lowered for this GPU (for CUDA off one):
    {'rows', 'triton_kernels', 'missing_kernels', 'passed'}."""
    traced = jax.jit(compiled_fn).trace(*args)
    text = traced.lower().as_text() if common.on_gpu() else traced.lower(lowering_platforms=("cuda",)).as_text()
    found = triton_calls(text)
    missing = sorted(set(kernels) - set(found))
    return {
        "rows": rows,
        "triton_kernels": found,
        "missing_kernels": missing,
        "passed": all(r["passed"] for r in rows) and not missing,
    }
