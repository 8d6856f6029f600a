"""Router math (skymoe_jax/model/moe/router.py) against numpy formulas written out here:
gating logit normalization, softmax, top-k with renormalization, both auxiliary-loss
forms, the z-loss and the paper's router statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skymoe_jax.model.moe import router

T, E = 16, 8


def _logits(seed: int, scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).normal(size=(T, E))).astype(np.float32)


def _np_normalize(z, lam, ddof, eps):
    z = z.astype(np.float64)
    return lam * (z - z.mean(-1, keepdims=True)) / (np.std(z, axis=-1, ddof=ddof, keepdims=True) + eps)


def _np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_logsumexp(z):
    m = z.max(-1)
    return m + np.log(np.exp(z - m[:, None]).sum(-1))


# float32 mean/std/divide over 8 logits of size O(1) is good to a few 1e-7; 1e-5 is far below
# what a wrong ddof (a factor sqrt(8/7) ~ 1.07), a missing mean or a misplaced lambda would give.
RTOL = 1e-5


@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("lam", [0.5, 1.0, 2.0])
def test_normalize_logits_matches_numpy(ddof, lam):
    z = _logits(0, scale=3.0)
    got = router.normalize_logits(z, lam, ddof, 1e-6)
    np.testing.assert_allclose(got, _np_normalize(z, lam, ddof, 1e-6), rtol=RTOL, atol=RTOL)


def test_normalize_logits_of_equal_logits_is_finite():
    # std = 0 for a token whose logits are all equal: eps must keep the gate uniform, not NaN.
    # (z - mean is a float32 rounding residue here, so z' is a constant, not exactly 0.)
    z = np.full((2, E), 0.7, np.float32)
    r = router.route(z, 2, gate_norm=True, lam=1.0, ddof=1, eps=1e-6)
    assert np.all(np.isfinite(r.logits))
    np.testing.assert_allclose(r.probs, 1.0 / E, rtol=1e-6)


def _np_normalize_vjp(z, c, lam, ddof, eps):
    """c^T d z'/dz for z' = lam * u / (s + eps), u = z - mean(z), s = sqrt(sum u^2 / (E - ddof)), taking
    ds/dz = 0 where s = 0 (all z equal): z' is differentiable there, with Jacobian lam * (I - 1/E) / eps."""
    z, c = z.astype(np.float64), c.astype(np.float64)
    u = z - z.mean(-1, keepdims=True)
    s = np.sqrt((u * u).sum(-1, keepdims=True) / (z.shape[-1] - ddof))
    direct = lam * (c - c.mean(-1, keepdims=True)) / (s + eps)
    ds = np.divide(u, (z.shape[-1] - ddof) * s, out=np.zeros_like(u), where=s > 0)
    return direct - lam * (c * u).sum(-1, keepdims=True) / (s + eps) ** 2 * ds


@pytest.mark.parametrize("ddof", [0, 1])
def test_normalize_logits_gradient_at_equal_logits(ddof):
    # A zero-initialised router (fine-grained upcycling) gives every token equal logits: std = 0, where
    # jnp.std's derivative is 0 * inf = NaN. Rows whose float32 mean is exact, so z - mean is exactly 0,
    # beside ordinary rows.
    lam, eps = 2.0, 1e-6
    z = _logits(2)
    z[:3] = np.array([[0.0], [1.0], [-2.5]], np.float32)
    c = _logits(3)
    out, vjp = jax.vjp(lambda z: router.normalize_logits(z, lam, ddof, eps), jnp.asarray(z))
    (grad,) = vjp(jnp.asarray(c))
    assert np.all(np.asarray(out[:3]) == 0.0)
    kink = lam * (c[:3] - c[:3].mean(-1, keepdims=True, dtype=np.float64)) / eps
    # float32 rounding of c - mean(c), relative to the row's scale lam / eps
    np.testing.assert_allclose(grad[:3], kink, rtol=1e-6, atol=1e-6 * np.abs(kink).max())
    np.testing.assert_allclose(grad, _np_normalize_vjp(z, c, lam, ddof, eps), rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("gate_norm", [True, False])
@pytest.mark.parametrize("ddof", [0, 1])
def test_route_probs_are_softmax_of_fed_logits(gate_norm, ddof):
    # Small raw logits: the near-uniform regime where normalization changes the gate the most.
    z = _logits(1, scale=0.1)
    lam = 2.0
    r = router.route(z, 2, gate_norm=gate_norm, lam=lam, ddof=ddof, eps=1e-6)
    fed = _np_normalize(z, lam, ddof, 1e-6) if gate_norm else z.astype(np.float64)
    np.testing.assert_allclose(r.logits, fed, rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(r.probs, _np_softmax(fed), rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_weights_and_experts(k, renormalize):
    z = _logits(2)
    r = router.route(z, k, gate_norm=True, renormalize=renormalize)
    probs = _np_softmax(_np_normalize(z, 1.0, 0, 1e-6))
    # Continuous random logits have no ties, so the order is unambiguous.
    experts = np.argsort(-probs, axis=-1)[:, :k]
    np.testing.assert_array_equal(r.experts, experts)
    top = np.take_along_axis(probs, experts, axis=-1)
    expected = top / top.sum(-1, keepdims=True) if renormalize else top
    np.testing.assert_allclose(r.weights, expected, rtol=RTOL)


@pytest.mark.parametrize("k", [1, 2, 3, E])
def test_top_k_by_argmax_is_lax_top_k(k):
    """Values, indices, the order of equal values (lowest index first) and the gradient, against
    jax.lax.top_k on rows with repeated values, including a row of all-equal values."""
    x = np.round(np.random.default_rng(3).normal(size=(T, E)), 1).astype(np.float32)
    x[0] = 0.25
    x[1, 2] = x[1, 5] = x[1].max() + 1
    values, indices = router.top_k_by_argmax(jnp.asarray(x), k)
    ref_values, ref_indices = jax.lax.top_k(jnp.asarray(x), k)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_array_equal(values, ref_values)
    assert indices.dtype == jnp.int32
    cotangent = np.random.default_rng(4).normal(size=(T, k)).astype(np.float32)
    grad = jax.grad(lambda a: jnp.sum(router.top_k_by_argmax(a, k)[0] * cotangent))(jnp.asarray(x))
    ref_grad = jax.grad(lambda a: jnp.sum(jax.lax.top_k(a, k)[0] * cotangent))(jnp.asarray(x))
    np.testing.assert_array_equal(grad, ref_grad)


def _probs_and_choices(seed: int, k: int = 2):
    # Skewed logits so the gate is far from balanced and both losses are far from their minima.
    z = _logits(seed, scale=2.0) + np.linspace(0.0, 2.0, E, dtype=np.float32)
    probs = _np_softmax(z.astype(np.float64))
    return probs.astype(np.float32), np.argsort(-probs, axis=-1)[:, :k].astype(np.int32)


def test_aux_loss_paper_matches_numpy():
    probs, _ = _probs_and_choices(3)
    expected = np.sum((1.0 / E - probs.astype(np.float64).mean(0)) ** 2)
    np.testing.assert_allclose(router.aux_loss_paper(probs), expected, rtol=RTOL)


def test_aux_loss_switch_matches_numpy():
    probs, experts = _probs_and_choices(4, k=2)
    f = np.bincount(experts.ravel(), minlength=E) / experts.size  # share of all T*k assignments
    expected = E * np.sum(f * probs.astype(np.float64).mean(0))
    np.testing.assert_allclose(router.aux_loss_switch(probs, experts), expected, rtol=RTOL)


def test_aux_losses_at_a_uniform_gate():
    probs = np.full((E, E), 1.0 / E, np.float32)
    experts = np.stack([np.arange(E), (np.arange(E) + 1) % E], axis=1).astype(np.int32)  # each expert chosen twice
    np.testing.assert_allclose(router.aux_loss_paper(probs), 0.0, atol=1e-12)
    np.testing.assert_allclose(router.aux_loss_switch(probs, experts), 1.0, rtol=1e-6)


def test_z_loss_matches_numpy():
    z = _logits(5, scale=3.0)
    expected = np.mean(_np_logsumexp(z.astype(np.float64)) ** 2)
    np.testing.assert_allclose(router.z_loss(z), expected, rtol=RTOL)


def test_router_stats_on_a_hand_built_gate():
    probs = np.array(
        [
            [0.5, 0.25, 0.125, 0.125],  # Max1/Max2 = 2,   Max2/Max3 = 2
            [0.4, 0.1, 0.4, 0.1],  # 1,   4
            [0.1, 0.2, 0.3, 0.4],
        ],
        np.float32,
    )  # 4/3, 3/2
    experts = np.array([[0, 1], [0, 2], [3, 2]], np.int32)
    stats = router.router_stats(probs, experts)
    np.testing.assert_allclose(stats["max1_max2"], (2 + 1 + 4 / 3) / 3, rtol=1e-6)
    np.testing.assert_allclose(stats["max2_max3"], (2 + 4 + 1.5) / 3, rtol=1e-6)
    np.testing.assert_allclose(stats["expert_load"], [2 / 6, 1 / 6, 2 / 6, 1 / 6], rtol=1e-6)
    entropy = np.mean(-np.sum(probs * np.log(probs), axis=-1))
    np.testing.assert_allclose(stats["router_entropy"], entropy, rtol=1e-6)


def test_router_stats_edge_cases():
    # A zero probability contributes 0 * log 0 = 0 to the entropy, not NaN.
    probs = np.array([[0.5, 0.5, 0.0]], np.float32)
    stats = router.router_stats(probs, np.array([[0, 1]], np.int32))
    np.testing.assert_allclose(stats["router_entropy"], np.log(2.0), rtol=1e-6)
    # Two experts have no third-largest probability.
    two = router.router_stats(np.array([[0.75, 0.25]], np.float32), np.array([[0, 1]], np.int32))
    np.testing.assert_allclose(two["max1_max2"], 3.0, rtol=1e-6)
    assert np.isnan(two["max2_max3"])


def _np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


@pytest.mark.parametrize("gate_norm", [True, False])
@pytest.mark.parametrize("renormalize", [True, False])
def test_sigmoid_route_matches_numpy(gate_norm, renormalize):
    """DeepSeek-V3's scores: top-k on each expert's own sigmoid, the chosen scores as weights (summing to 1 when
    renormalized), and the scores normalized to sum 1 as the gate probabilities of the losses and statistics."""
    z, k = _logits(5, scale=2.0), 3
    r = router.route(z, k, gate_norm=gate_norm, lam=2.0, renormalize=renormalize, score="sigmoid")
    fed = _np_normalize(z, 2.0, 0, 1e-6) if gate_norm else z.astype(np.float64)
    s = _np_sigmoid(fed)
    experts = np.argsort(-s, axis=-1)[:, :k]
    np.testing.assert_array_equal(r.experts, experts)
    top = np.take_along_axis(s, experts, axis=-1)
    np.testing.assert_allclose(r.weights, top / top.sum(-1, keepdims=True) if renormalize else top, rtol=RTOL)
    np.testing.assert_allclose(r.probs, s / s.sum(-1, keepdims=True), rtol=RTOL)
    np.testing.assert_allclose(r.logits, fed, rtol=RTOL, atol=RTOL)


def _np_group_limited(scores, k, groups, top_groups, score):
    """Experts chosen group by group, written out: each group's score, the best groups, then top-k among their
    experts (-1 for the rest, below every score)."""
    t, n = scores.shape
    per = n // groups
    chosen = np.zeros((t, k), np.int64)
    for i in range(t):
        parts = scores[i].reshape(groups, per)
        rank = np.sort(parts, axis=1)[:, ::-1]
        group_score = rank[:, :2].sum(1) if score == "sigmoid" else rank[:, 0]
        best = np.argsort(-group_score, kind="stable")[:top_groups]
        allowed = np.where(np.isin(np.arange(n) // per, best), scores[i], -1.0)
        chosen[i] = np.argsort(-allowed, kind="stable")[:k]
    return chosen


@pytest.mark.parametrize(
    "score,groups,top_groups,k",
    [("sigmoid", 4, 2, 3), ("softmax", 4, 1, 2), ("sigmoid", 2, 1, 4), ("softmax", 2, 1, 3)],
)
def test_group_limited_routing_matches_numpy(score, groups, top_groups, k):
    z = _logits(6, scale=2.0)
    r = router.route(z, k, gate_norm=True, score=score, num_groups=groups, top_groups=top_groups)
    fed = _np_normalize(z, 1.0, 0, 1e-6)
    scores = _np_sigmoid(fed) if score == "sigmoid" else _np_softmax(fed)
    experts = _np_group_limited(scores, k, groups, top_groups, score)
    np.testing.assert_array_equal(r.experts, experts)
    top = np.take_along_axis(scores, experts, axis=-1)
    np.testing.assert_allclose(r.weights, top / top.sum(-1, keepdims=True), rtol=RTOL)
    # The limit binds: without it some tokens would take experts from more groups.
    free = router.route(z, k, gate_norm=True, score=score)
    used = lambda e: np.array([len(set(row // (E // groups))) for row in np.asarray(e)])  # noqa: E731
    assert used(r.experts).max() <= top_groups < used(free.experts).max()


def test_interleaved_rows_mix_the_sequences_and_keep_the_positions():
    """Position j of row r comes from row (r + j) mod rows: each row one token of each position, a loop's answer."""
    rows, seq_len = 3, 7
    tokens = np.stack(np.meshgrid(np.arange(rows), np.arange(seq_len), indexing="ij"), -1).reshape(-1, 2)
    mixed = np.asarray(router.interleaved_rows(jnp.asarray(tokens), seq_len)).reshape(rows, seq_len, 2)
    for r in range(rows):
        for j in range(seq_len):
            assert tuple(mixed[r, j]) == ((r + j) % rows, j)
    # Rows that each keep to one expert are as unbalanced as can be; mixed, each row sees every sequence's expert.
    one_expert_per_row = jax.nn.one_hot(np.repeat(np.arange(rows), seq_len), rows)
    row_load = router.interleaved_rows(one_expert_per_row, seq_len).reshape(rows, seq_len, rows).mean(1)
    np.testing.assert_allclose(router.max_violation(one_expert_per_row.reshape(rows, seq_len, rows).mean(1)), rows - 1)
    np.testing.assert_allclose(router.max_violation(row_load), rows * 3 / 7 - 1, rtol=1e-6)


def test_max_violation_matches_numpy():
    load = np.random.default_rng(7).dirichlet(np.ones(E), size=3).astype(np.float32)
    np.testing.assert_allclose(router.max_violation(load), load.max(-1) / load.mean(-1) - 1, rtol=1e-6)
    np.testing.assert_allclose(router.max_violation(np.full(E, 1 / E, np.float32)), 0.0, atol=1e-6)
    np.testing.assert_allclose(router.max_violation(np.eye(E, dtype=np.float32)[0]), E - 1)
