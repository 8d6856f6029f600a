"""Pallas routing kernels (skymoe_jax/kernels/) against their XLA twins, on the CPU.

The kernels run in interpret mode here, which executes them with ordinary JAX ops, so these
tests check the kernels' semantics (masking at ragged edges, top-k order, counting sort,
the custom VJPs) but not that Triton accepts them: the CUDA-lowering tests below do that
without a GPU. Sizes are chosen so that each kernel covers a partial last block, a single
block, and several blocks, with E in {8, 16, 64} (and a non-power-of-two E) and k in
{1, 2, 4, 8} (and a non-power-of-two k).

Tolerances: indices and counts must be equal. Float outputs differ from the twins only by
the order of float32 additions (reductions over E experts, over k choices, over the width
for the weight gradient), so they agree to a few ulps of the values involved: rtol 1e-6
relative to each array's largest magnitude (atol) is a handful of float32 ulps (eps 1.2e-7)
and far below any real error (a wrong row or a missed term is O(1)).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from skymoe_jax.config import capacity
from skymoe_jax.kernels import gather, grouped_matmul
from skymoe_jax.kernels.combine import combine
from skymoe_jax.kernels.common import compiler_params
from skymoe_jax.kernels.dispatch import dispatch as dispatch_kernel
from skymoe_jax.kernels.positions import expert_positions
from skymoe_jax.kernels.route import route
from skymoe_jax.model.moe import dispatch, router

TRITON_CALL = "__gpu$xla.gpu.triton"


def _close(actual, expected, rtol=1e-6):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(1.0, np.max(np.abs(expected))))


def _choices(rng, tokens, experts, k):
    """[tokens, k] distinct experts per token, as top-k produces."""
    return np.argsort(rng.random((tokens, experts)), axis=1)[:, :k].astype(np.int32)


def _slots(rng, tokens, experts, k, capacity_factor):
    """Flat slots [tokens, k] (-1 where dropped) and the slot count, through the XLA position rule."""
    chosen = jnp.asarray(_choices(rng, tokens, experts, k))
    cap = capacity(tokens, experts, k, capacity_factor)
    positions = dispatch.expert_positions(chosen, experts).positions
    return dispatch.slot_indices(chosen, positions, cap), experts * cap


# (tokens, E, k, route options): the route kernel's block is 128 tokens up to E=32, 64 at E=64.
ROUTE_CASES = [
    (37, 8, 1, dict(gate_norm=True)),  # one partial block
    (200, 16, 2, dict(gate_norm=True, ddof=1, lam=2.0)),  # a full block and a partial one
    (130, 64, 8, dict(gate_norm=True, eps=1e-3)),  # three blocks, the last holds 2 tokens
    (99, 64, 4, dict(gate_norm=False, renormalize=False)),
    (50, 6, 3, dict(gate_norm=True, ddof=1)),  # E and k not powers of two: padded columns
    (50, 6, 3, dict(gate_norm=True, lam=2.0, score="sigmoid")),  # sigmoid scores in padded tiles
    (99, 64, 4, dict(gate_norm=False, renormalize=False, score="sigmoid")),
]


@pytest.mark.parametrize("tokens,experts,k,options", ROUTE_CASES)
def test_route_matches_router_route_with_gradients(tokens, experts, k, options):
    rng = np.random.default_rng(tokens)
    z = jnp.asarray(rng.normal(size=(tokens, experts)).astype(np.float32))
    cotangents = [
        jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in ((tokens, experts), (tokens, k), (tokens, experts))
    ]

    def run(fn):
        def loss(z):
            r = fn(z, k, **options)
            return sum(jnp.sum(a * c) for a, c in zip((r.probs, r.weights, r.logits), cotangents)), r

        (_, r), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(z)
        return r, grad

    (r, grad), (twin, twin_grad) = run(route), run(router.route)
    np.testing.assert_array_equal(r.experts, twin.experts)
    assert r.experts.dtype == jnp.int32
    for name in ("probs", "weights", "logits"):
        _close(getattr(r, name), getattr(twin, name))
    _close(grad, twin_grad)


@pytest.mark.parametrize("ddof", [0, 1])
def test_route_gradient_at_equal_logits(ddof):
    """Rows of equal logits (a zero router): std = 0, where z' = lam * (z - mean) / (std + eps) = 0 has the
    Jacobian lam * (I - 1/E) / eps. The reference applies it to the gradient with respect to z' at z' = 0,
    taken through the twin without normalization; the other rows keep the twin as reference."""
    tokens, experts, k, lam, eps = 37, 6, 2, 2.0, 1e-6
    rng = np.random.default_rng(ddof)
    z = rng.normal(size=(tokens, experts)).astype(np.float32)
    z[::3] = np.array([0.0, 1.0, -2.5] * 5)[: len(z[::3]), None]  # float32 means of these rows are exact
    cotangents = [
        jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in ((tokens, experts), (tokens, k), (tokens, experts))
    ]

    def grad(fn, z, **options):
        def loss(z):
            r = fn(z, k, **options)
            return sum(jnp.sum(a * c) for a, c in zip((r.probs, r.weights, r.logits), cotangents))

        return np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(z)))

    options = dict(gate_norm=True, lam=lam, ddof=ddof, eps=eps)
    got, twin = grad(route, z, **options), grad(router.route, z, **options)
    d_zn = grad(router.route, np.zeros_like(z), gate_norm=False)
    kink = lam * (d_zn - d_zn.mean(axis=1, keepdims=True)) / eps
    assert np.all(np.isfinite(got)) and np.all(np.isfinite(twin))
    _close(got[::3], kink[::3])
    _close(twin[::3], kink[::3])
    _close(got, twin)


def test_route_breaks_ties_like_top_k():
    z = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    z[0] = 1.0  # all equal: the first k experts
    z[1, [2, 5]] = 9.0  # two equal maxima
    z[2, [1, 3, 6]] = -9.0  # equal minima past the k-th choice
    for gate_norm in (True, False):
        r, twin = route(jnp.asarray(z), 4, gate_norm=gate_norm), router.route(jnp.asarray(z), 4, gate_norm=gate_norm)
        np.testing.assert_array_equal(r.experts, twin.experts)
        _close(r.weights, twin.weights)


# (tokens, E, k): the counting sort's block is 512 assignments at E=8, 256 at E=16, 64 at E=64.
POSITION_CASES = [(37, 8, 2), (300, 64, 8), (700, 16, 1), (77, 16, 4), (45, 6, 3), (256, 8, 2)]


@pytest.mark.parametrize("tokens,experts,k", POSITION_CASES)
def test_positions_match_expert_positions(tokens, experts, k):
    chosen = jnp.asarray(_choices(np.random.default_rng(tokens), tokens, experts, k))
    slots, twin = expert_positions(chosen, experts), dispatch.expert_positions(chosen, experts)
    np.testing.assert_array_equal(slots.positions, twin.positions)
    np.testing.assert_array_equal(slots.counts, twin.counts)
    assert slots.positions.dtype == jnp.int32 and slots.counts.dtype == jnp.int32


def test_positions_vmapped_over_groups_and_probs_policy():
    """The block vmaps positions over routing groups; the `probs` policy takes the XLA path."""
    rng = np.random.default_rng(1)
    chosen = jnp.asarray(np.stack([_choices(rng, 90, 16, 2) for _ in range(3)]))
    by_group = jax.vmap(lambda e: expert_positions(e, 16).positions)(chosen)
    np.testing.assert_array_equal(by_group, jax.vmap(lambda e: dispatch.expert_positions(e, 16).positions)(chosen))
    priority = jnp.asarray(rng.random((90, 2)).astype(np.float32))
    np.testing.assert_array_equal(
        expert_positions(chosen[0], 16, priority).positions,
        dispatch.expert_positions(chosen[0], 16, priority).positions,
    )


# (tokens, E, k, width, capacity factor): every case drops some assignments and leaves slots empty.
GATHER_CASES = [
    (37, 8, 2, 64, 1.0),
    (300, 64, 8, 40, 0.9),  # width not a power of two
    (130, 16, 1, 300, 1.25),  # width over one 256-column tile
    (77, 16, 4, 96, 0.8),
    (45, 6, 3, 20, 1.0),
]


@pytest.mark.parametrize("tokens,experts,k,width,capacity_factor", GATHER_CASES)
def test_dispatch_and_combine_kernels_match_xla_with_gradients(tokens, experts, k, width, capacity_factor):
    rng = np.random.default_rng(tokens + width)
    slots, num_slots = _slots(rng, tokens, experts, k, capacity_factor)
    assert 0 < int(jnp.sum(slots < 0)) and int(jnp.sum(slots >= 0)) < num_slots
    x = jnp.asarray(rng.normal(size=(tokens, width)).astype(np.float32))
    y = jnp.asarray(rng.normal(size=(num_slots, width)).astype(np.float32))
    w = jnp.asarray(rng.random((tokens, k)).astype(np.float32))
    c_slots = jnp.asarray(rng.normal(size=(num_slots, width)).astype(np.float32))
    c_tokens = jnp.asarray(rng.normal(size=(tokens, width)).astype(np.float32))

    def run(dispatch_fn, combine_fn):
        def loss(x, y, w):
            p, c = dispatch_fn(x, slots, num_slots), combine_fn(y, slots, w)
            return jnp.sum(p * c_slots) + jnp.sum(c * c_tokens), (p, c)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, y, w)

    (_, (p, c)), grads = run(dispatch_kernel, combine)
    (_, (p_twin, c_twin)), twin_grads = run(dispatch.dispatch, dispatch.combine)
    np.testing.assert_array_equal(p, p_twin)  # a copy: exact
    _close(c, c_twin)
    for g, g_twin in zip(grads, twin_grads):
        _close(g, g_twin)


def test_dispatch_and_combine_bfloat16_and_vmapped_over_groups():
    """As the block calls them: vmapped over groups, activations in bfloat16, weights float32."""
    rng = np.random.default_rng(5)
    groups = [_slots(rng, 60, 8, 2, 1.0) for _ in range(2)]
    slots, num_slots = jnp.stack([s for s, _ in groups]), groups[0][1]
    x = jnp.asarray(rng.normal(size=(2, 60, 48)), jnp.bfloat16)
    y = jnp.asarray(rng.normal(size=(2, num_slots, 48)), jnp.bfloat16)
    w = jnp.asarray(rng.random((2, 60, 2)).astype(np.float32))
    vmapped = lambda f: jax.vmap(f, in_axes=(0, 0, None))  # noqa: E731
    p = vmapped(dispatch_kernel)(x, slots, num_slots)
    assert p.dtype == jnp.bfloat16
    np.testing.assert_array_equal(p, vmapped(dispatch.dispatch)(x, slots, num_slots))
    c, c_twin = jax.vmap(combine)(y, slots, w), jax.vmap(dispatch.combine)(y, slots, w)
    assert c.dtype == jnp.bfloat16
    # Both round the weights to bfloat16; the sums of k=2 products may round differently: one bf16 ulp.
    _close(c, c_twin, rtol=2**-7)


def _unwritten(a) -> np.ndarray:
    """Interpret mode starts every output buffer poisoned: NaN for floats, the minimum for ints."""
    a = np.asarray(a)
    return np.isnan(a) if np.issubdtype(a.dtype, np.floating) else a == np.iinfo(a.dtype).min


def test_unwritten_output_elements_are_detected():
    """The poison check below can fail: a copy kernel that skips its last (partial) block is caught."""

    def skip_last(x_ref, o_ref):
        i = pl.program_id(0)
        rows = i * 16 + jnp.arange(16)

        @pl.when(i < pl.num_programs(0) - 1)
        def _():
            plgpu.store(
                o_ref.at[pl.ds(i * 16, 16)], plgpu.load(x_ref.at[pl.ds(i * 16, 16)], mask=rows < 40), mask=rows < 40
            )

    for dtype in (jnp.float32, jnp.int32):
        x = jnp.ones((40,), dtype)
        out = pl.pallas_call(
            skip_last,
            out_shape=jax.ShapeDtypeStruct((40,), dtype),
            grid=(3,),
            compiler_params=compiler_params(),
            interpret=True,
        )(x)
        np.testing.assert_array_equal(np.flatnonzero(_unwritten(out)), np.arange(32, 40))


@pytest.mark.parametrize("tokens,experts,k,width", [(130, 64, 8, 40), (37, 8, 2, 300)])
def test_every_output_element_is_written(tokens, experts, k, width):
    rng = np.random.default_rng(7)
    z = jnp.asarray(rng.normal(size=(tokens, experts)).astype(np.float32))
    slots, num_slots = _slots(rng, tokens, experts, k, 0.7)
    x = jnp.asarray(rng.normal(size=(tokens, width)).astype(np.float32))
    y = jnp.asarray(rng.normal(size=(num_slots, width)).astype(np.float32))
    w = jnp.asarray(rng.random((tokens, k)).astype(np.float32))
    chosen = jnp.asarray(_choices(rng, tokens, experts, k))

    @jax.jit
    def every_kernel(z, chosen, slots, x, y, w):
        sources = gather.slot_sources(slots, num_slots, interpret=True)
        return {
            "route": route(z, k, gate_norm=True),
            "route backward": jax.grad(lambda z: jnp.sum(route(z, k, gate_norm=True).weights[:, 0]))(z),
            "positions": expert_positions(chosen, experts),
            "slot_sources": sources,
            "gather_rows": gather.gather_rows(x, sources, k, interpret=True),
            "gather_rows scaled": gather.gather_rows(x, sources, k, w.reshape(-1), interpret=True),
            "gather_sum": gather.gather_sum(y, slots, interpret=True),
            "gather_sum weighted": gather.gather_sum(y, slots, w, interpret=True),
            "gather_dot": gather.gather_dot(x, y, slots, interpret=True),
        }

    for name, out in every_kernel(z, chosen, slots, x, y, w).items():
        for leaf in jax.tree.leaves(out):
            assert not _unwritten(leaf).any(), f"{name}: {int(_unwritten(leaf).sum())} elements never written"


def _lowered(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _kernels(text: str) -> list[str]:
    """Names of the Triton kernels in lowered StableHLO, in order."""
    assert "mosaic" not in text.lower()  # Triton, as the compiler params ask, not Mosaic GPU
    names = [chunk.split('name = "', 1)[1].split('"', 1)[0] for chunk in text.split(TRITON_CALL)[1:]]
    assert len(names) == text.count(TRITON_CALL)
    return names


# The benchmark shapes (lowering does not run anything, so full size costs nothing) and edge cases.
LOWERING_CASES = [(16384, 4096, 16, 2), (32768, 2048, 64, 8), (1000, 96, 8, 1), (777, 300, 64, 4), (50, 20, 6, 3)]


@pytest.mark.parametrize("tokens,width,experts,k", LOWERING_CASES)
def test_kernels_lower_for_cuda_through_triton(tokens, width, experts, k):
    z = jax.ShapeDtypeStruct((tokens, experts), jnp.float32)
    chosen = jax.ShapeDtypeStruct((tokens, k), jnp.int32)
    num_slots = experts * capacity(tokens, experts, k, 1.25)
    x = jax.ShapeDtypeStruct((tokens, width), jnp.bfloat16)
    y = jax.ShapeDtypeStruct((num_slots, width), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((tokens, k), jnp.float32)
    compiled = dict(interpret=False)

    def route_and_grad(z, score):
        return jax.value_and_grad(
            lambda z: jnp.sum(route(z, k, gate_norm=True, ddof=1, score=score, **compiled).weights)
        )(z)

    for score in ("softmax", "sigmoid"):
        assert _kernels(_lowered(functools.partial(route_and_grad, score=score), z)) == [
            "skymoe_route",
            "skymoe_route_bwd",
        ]
    assert _kernels(_lowered(lambda e: expert_positions(e, experts, **compiled), chosen)) == [
        "skymoe_expert_counts",
        "skymoe_expert_ranks",
    ]
    dispatch_grad = jax.value_and_grad(
        lambda x, s: jnp.sum(dispatch_kernel(x, s, num_slots, **compiled).astype(jnp.float32))
    )
    assert _kernels(_lowered(dispatch_grad, x, chosen)) == [
        "skymoe_slot_sources",
        "skymoe_gather_rows",
        "skymoe_gather_sum",
    ]
    combine_grads = jax.value_and_grad(
        lambda y, s, w: jnp.sum(combine(y, s, w, **compiled).astype(jnp.float32)), (0, 2)
    )
    assert sorted(_kernels(_lowered(combine_grads, y, chosen, w))) == [
        "skymoe_gather_dot",
        "skymoe_gather_rows",
        "skymoe_gather_sum",
        "skymoe_slot_sources",
    ]


def test_vmapped_kernels_lower_for_cuda():
    """The block vmaps positions, dispatch and combine over routing groups: a grid axis more."""
    g, s, e, k, d = 4, 300, 16, 2, 128
    num_slots = e * capacity(s, e, k, 1.25)
    chosen = jax.ShapeDtypeStruct((g, s, k), jnp.int32)
    x = jax.ShapeDtypeStruct((g, s, d), jnp.bfloat16)
    y = jax.ShapeDtypeStruct((g, num_slots, d), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((g, s, k), jnp.float32)
    positions = functools.partial(expert_positions, num_experts=e, interpret=False)
    text = _lowered(
        lambda e_, x, y, w: (
            jax.vmap(positions)(e_),
            jax.vmap(functools.partial(dispatch_kernel, num_slots=num_slots, interpret=False))(x, e_),
            jax.vmap(functools.partial(combine, interpret=False))(y, e_, w),
        ),
        chosen,
        x,
        y,
        w,
    )
    assert _kernels(text) == [
        "skymoe_expert_counts",
        "skymoe_expert_ranks",
        "skymoe_slot_sources",
        "skymoe_gather_rows",
        "skymoe_gather_sum",
    ]


# Grouped matmul (kernels/grouped_matmul.py). (group sizes, rows, K, N, dtype, tiles): 16-row tiles straddle the
# groups; empty groups, a group of 1, odd sizes, rows past the last group (they come out zero), one group holding
# every row; bfloat16 with the default tiles shrunk to the operands.
GROUPED_CASES = [
    ([0, 1, 17, 5, 0, 30], 60, 24, 40, jnp.float32, grouped_matmul.Tiles(16, 16, 16)),
    ([0, 0, 45, 0], 45, 32, 16, jnp.float32, grouped_matmul.Tiles(16, 16, 16)),
    ([3, 0, 29, 12], 44, 48, 20, jnp.bfloat16, None),
]


def _grouped_reference(x, w, sizes, dy):
    """(y, dx, dw) of y[rows of e] = x[rows of e] @ w[e] in float64, group by group."""
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    y, dx, dw = np.zeros((x.shape[0], w.shape[2])), np.zeros_like(x), np.zeros_like(w)
    for e, (start, end) in enumerate(zip(np.cumsum(sizes) - sizes, np.cumsum(sizes))):
        y[start:end] = x[start:end] @ w[e]
        dx[start:end] = dy[start:end] @ w[e].T
        dw[e] = x[start:end].T @ dy[start:end]
    return y, dx, dw


@pytest.mark.parametrize("sizes,rows,k,n,dtype,tiles", GROUPED_CASES)
def test_grouped_matmul_matches_numpy_with_gradients(sizes, rows, k, n, dtype, tiles):
    """Against float64 numpy of the same (rounded) inputs. float32: sums of at most 60 products, a few ulps of
    the largest value (rtol 1e-5 of it). bfloat16: the outputs are rounded to bfloat16 (2^-9 of each element)
    after a float32 accumulation, so 2^-8. Interpret mode poisons unwritten outputs with NaN, which fails too."""
    rng = np.random.default_rng(len(sizes) + rows)
    x, dy = (jnp.asarray(rng.normal(size=s), dtype) for s in ((rows, k), (rows, n)))
    w = jnp.asarray(rng.normal(size=(len(sizes), k, n)), dtype)
    group_sizes = jnp.asarray(sizes, jnp.int32)

    def loss(x, w):
        y = grouped_matmul.grouped_matmul(x, w, group_sizes, tiles=tiles, interpret=True)
        return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32)), y

    (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(x, w)
    rtol = 1e-5 if dtype == jnp.float32 else 2**-8
    for got, expected in zip((y, dx, dw), _grouped_reference(x, w, np.asarray(sizes), dy)):
        assert got.dtype == dtype
        _close(got, expected, rtol=rtol)


@pytest.mark.parametrize(
    "rows,k,n,experts,dtype", [(8192, 512, 1024, 8, jnp.bfloat16), (1000, 96, 300, 6, jnp.float32)]
)
def test_grouped_matmul_lowers_for_cuda_through_triton(rows, k, n, experts, dtype):
    x = jax.ShapeDtypeStruct((rows, k), dtype)
    w = jax.ShapeDtypeStruct((experts, k, n), dtype)
    sizes = jax.ShapeDtypeStruct((experts,), jnp.int32)

    def value_and_grads(x, w, sizes):
        mm = functools.partial(grouped_matmul.grouped_matmul, group_sizes=sizes, interpret=False)
        return jax.value_and_grad(lambda x, w: jnp.sum(mm(x, w).astype(jnp.float32)), (0, 1))(x, w)

    assert _kernels(_lowered(value_and_grads, x, w, sizes)) == [
        "skymoe_grouped_matmul",
        "skymoe_grouped_matmul_t",
        "skymoe_grouped_matmul_dw",
    ]
