"""MoEBlock and Experts (skymoe_jax/model/moe/block.py, experts.py) against a dense numpy
reference: every expert computed on every token, weighted by the renormalized top-k gate,
with dropped assignments (found by the policy rule, in numpy) weighted 0."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from skymoe_jax.config import base_config
from skymoe_jax.kernels import cpu_expert_ffn, cpu_ffi
from skymoe_jax.model.axes import AXES, batch_axes
from skymoe_jax.model.layers import SwiGLU
from skymoe_jax.model.moe import router
from skymoe_jax.model.moe.block import MoEBlock
from skymoe_jax.model.spec import ModelSpec

D, E, K, F = 16, 4, 2, 8
B, S = 2, 8  # 16 tokens; the default group is one sequence of S
AMPLE = E / K  # capacity factor giving every expert room for the whole group: nothing can drop


def _spec(dtype="float32", **moe) -> ModelSpec:
    c = base_config()
    c.model.d_model = D
    c.model.dtype = c.model.param_dtype = dtype
    c.moe.num_experts, c.moe.top_k, c.moe.expert_ffn_dim = E, K, F
    c.data.seq_len = S
    c.moe.group_size = 0  # one sequence per routing group unless a test says otherwise
    c.moe.update(moe)
    return ModelSpec.from_config(c)


def _materialize(ctor, seed=0, std=0.5):
    """Build a module with numpy-drawn parameters: jax.random would compile an RNG program per shape
    (about a second each on this CPU). std 0.5 keeps expert outputs and gate margins O(1)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(ctor))
    rng = np.random.default_rng(seed)
    return nnx.merge(graphdef, jax.tree.map(lambda a: (std * rng.normal(size=a.shape)).astype(a.dtype), abstract))


def _block(spec, seed=0):
    return _materialize(lambda: MoEBlock(spec, nnx.Rngs(params=0), "gshard"), seed)


def _x(seed=1, shape=(B, S, D)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _np_routing(tokens, gate, spec):
    z = tokens @ gate
    if spec.gate_norm:
        z = (
            spec.gate_norm_lambda
            * (z - z.mean(-1, keepdims=True))
            / (np.std(z, axis=-1, ddof=spec.gate_norm_ddof, keepdims=True) + spec.gate_norm_eps)
        )
    if spec.score == "sigmoid":
        scores = 1 / (1 + np.exp(-z))
        probs = scores / scores.sum(-1, keepdims=True)
    else:
        probs = np.exp(z - z.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        scores = probs
    experts = np.argsort(-scores, axis=-1)[:, : spec.top_k]
    weights = np.take_along_axis(scores, experts, axis=-1)
    if spec.renormalize:
        weights = weights / weights.sum(-1, keepdims=True)
    return probs, experts, weights * spec.routed_scale


def _np_keep(experts, probs, policy, group, cap):
    """Which assignments fit: per group, walk them in policy order and keep the first `cap` of each expert."""
    keep = np.zeros(experts.shape, bool)
    for start in range(0, experts.shape[0], group):
        e = experts[start : start + group]
        prio = np.take_along_axis(probs[start : start + group], e, -1) if policy == "probs" else np.zeros(e.shape)
        taken = np.zeros(probs.shape[-1], int)
        for i in sorted(range(e.size), key=lambda i: (-prio.flat[i], i)):
            t, j = divmod(i, e.shape[1])
            keep[start + t, j] = taken[e[t, j]] < cap
            taken[e[t, j]] += 1
    return keep


def _np_experts(block, tokens):
    """Every expert on every token, in float64: [T, E, d]."""
    wg, wu, wd = (
        np.asarray(v[...], np.float64) for v in (block.experts.w_gate, block.experts.w_up, block.experts.w_down)
    )
    h = np.einsum("td,edf->tef", tokens, wg)
    return np.einsum("tef,efd->ted", h / (1 + np.exp(-h)) * np.einsum("td,edf->tef", tokens, wu), wd)


def _np_moe(block, x, keep=None):
    """Dense reference: y_t = sum over chosen experts j of w_tj * keep_tj * Expert_j(x_t)."""
    spec = block.spec
    tokens = x.reshape(-1, D).astype(np.float64)
    probs, experts, weights = _np_routing(tokens, np.asarray(block.gate[...], np.float64), spec)
    if keep is not None:
        weights = weights * keep
    everything = _np_experts(block, tokens)
    chosen = np.take_along_axis(everything, experts[:, :, None], axis=1)  # [T, k, d]
    return np.einsum("tk,tkd->td", weights, chosen).reshape(x.shape), probs, experts


# float32 module vs float64 reference on O(1) values: differences are a few 1e-6;
# a wrong weight, expert or slot moves outputs by O(0.1).
TOL = dict(rtol=1e-4, atol=1e-4)

# The dropless modes get a tight capacity factor: it must not drop anything there, only be reported.
IMPLS = {
    "capacity": dict(capacity_factor=AMPLE),
    "dropless_ragged": dict(dropless=True, dropless_impl="ragged", capacity_factor=0.5),
    "dropless_padded": dict(dropless=True, dropless_impl="padded", capacity_factor=0.5),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("group_size", [0, 4])
def test_block_equals_dense_reference_when_nothing_drops(impl, group_size):
    spec = _spec(group_size=group_size, **IMPLS[impl])
    block = _block(spec)
    x = _x()
    y, stats = block(x, train=True)
    expected, probs, experts = _np_moe(block, x)
    np.testing.assert_allclose(y, expected, **TOL)

    # Dropless modes report what the configured capacity factor would have dropped; the ample one drops nothing.
    group = spec.group_size or S
    cap = int(np.ceil(spec.capacity_factor * group * K / E))
    would_drop = ~_np_keep(experts, probs, spec.drop_policy, group, cap)
    np.testing.assert_allclose(stats["drop_rate"], would_drop.sum() / (K * B * S), rtol=1e-6)


@pytest.mark.parametrize("renormalize", [True, False])
def test_sigmoid_scores_and_routed_scale_against_dense_reference(renormalize):
    spec = _spec(score="sigmoid", routed_scale=2.5, renormalize=renormalize, capacity_factor=AMPLE)
    block = _block(spec)
    x = _x()
    y, stats = block(x, train=True)
    expected, probs, _ = _np_moe(block, x)
    np.testing.assert_allclose(y, expected, **TOL)
    np.testing.assert_allclose(stats["mean_probs"], probs.mean(0), rtol=1e-5)


@pytest.mark.parametrize("form", ["paper", "switch"])
def test_per_sequence_statistics_against_numpy(form):
    """The sequence-wise aux loss and load imbalance: each row's P_j and f_j, its loss, then the mean over rows."""
    spec = _spec(aux_scope="sequence", aux_loss=form, capacity_factor=AMPLE)
    block = _block(spec)
    _, stats = block(_x(), train=True)
    _, probs, experts = _np_moe(block, _x())
    row_probs = probs.reshape(B, S, E).mean(1)
    row_load = np.eye(E)[experts].sum(1).reshape(B, S, E).mean(1) / K
    per_row = ((1 / E - row_probs) ** 2).sum(-1) if form == "paper" else E * (row_load * row_probs).sum(-1)
    np.testing.assert_allclose(stats["seq_aux_loss"], per_row.mean(), rtol=1e-5)
    np.testing.assert_allclose(stats["seq_max_vio"], (E * row_load.max(-1) - 1).mean(), rtol=1e-6)
    # The same imbalance of rows mixed from the sequences: position j of row r from row (r + j) mod B.
    assigned = np.eye(E)[experts].sum(1).reshape(B, S, E)
    mixed = np.stack([[assigned[(r + j) % B, j] for j in range(S)] for r in range(B)])
    np.testing.assert_allclose(stats["seq_max_vio_shuffled"], (E * (mixed.mean(1) / K).max(-1) - 1).mean(), rtol=1e-6)
    # Rows differ, so the mean of the rows' losses is not the loss of the batch means.
    whole = router.aux_loss_from_means(stats["mean_probs"], stats["expert_load"], form)
    assert abs(float(stats["seq_aux_loss"]) - float(whole)) > 1e-4


@pytest.mark.parametrize("gate", ["none", "sigmoid"])
def test_shared_experts_add_their_ffn_to_every_token(gate):
    spec = _spec(capacity_factor=AMPLE, num_shared_experts=2, shared_expert_ffn_dim=3, shared_expert_gate=gate)
    block = _block(spec)
    assert block.shared.w_up.shape == (D, 2 * 3)  # both shared experts as one FFN
    x = _x()
    y, _ = block(x, train=True)
    routed, _, _ = _np_moe(block, x)
    tokens = x.astype(np.float64)
    wg, wu, wd = (np.asarray(v[...], np.float64) for v in (block.shared.w_gate, block.shared.w_up, block.shared.w_down))
    h = tokens @ wg
    shared = (h / (1 + np.exp(-h)) * (tokens @ wu)) @ wd
    if gate == "sigmoid":  # Qwen2-MoE: a scalar per token
        shared = shared / (1 + np.exp(-(tokens @ np.asarray(block.shared_gate[...], np.float64))))
    np.testing.assert_allclose(y, routed + shared, **TOL)
    assert np.max(np.abs(shared)) > 0.1  # the shared part is large enough that leaving it out would show


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("group_size, cap", [(0, 2), (4, 1), (16, 4)])  # cap = ceil(0.5 * group * k / n)
def test_block_with_tight_capacity_zeroes_dropped_assignments(policy, group_size, cap):
    spec = _spec(group_size=group_size, capacity_factor=0.5, drop_policy=policy)
    block = _block(spec)
    x = _x()
    _, probs, experts = _np_moe(block, x)
    keep = _np_keep(experts, probs, policy, spec.group_size or S, cap)
    assert 0 < keep.sum() < keep.size  # some, not all, assignments drop
    y, stats = block(x, train=True)
    np.testing.assert_allclose(y, _np_moe(block, x, keep)[0], **TOL)
    np.testing.assert_allclose(stats["drop_rate"], (~keep).sum() / (K * B * S), rtol=1e-6)


def _hand_routed_block(spec, logits_by_class):
    """Token x = one-hot(class); gate row `class` holds that class's logits, so the routing is known."""
    block = _block(spec)
    gate = np.zeros((D, E), np.float32)
    gate[: len(logits_by_class)] = logits_by_class
    block.gate[...] = jnp.asarray(gate)
    return block


def _one_hot_tokens(classes):
    return np.eye(D, dtype=np.float32)[np.asarray(classes)]


CLASS_A, CLASS_B, CLASS_C = 0, 1, 2
HAND_LOGITS = [
    [4.0, 2.0, 0.0, 0.0],  # A -> experts 0, 1
    [2.0, 4.0, 0.0, 0.0],  # B -> experts 1, 0
    [0.0, 0.0, 4.0, 2.0],
]  # C -> experts 2, 3


# Sequence 0 is AAAAAAAA, sequence 1 is AAAACCCC. Per group and expert, drops = max(0, count - cap):
#   group 8,  cf 1 -> cap 4: seq 0 sends 8 to experts 0 and 1 (4 + 4 drops); seq 1 sends 4 to each: 8 / 32
#   group 4,  cf 1 -> cap 2: each AAAA or CCCC group sends 4 to two experts (2 + 2 drops), 4 groups: 16 / 32
#   group 16, cf 1 -> cap 8: experts 0, 1 get 12 (4 + 4 drops), experts 2, 3 get 4: 8 / 32
#   group 16, cf 2 -> cap 16: nothing drops
#   eval (eval_capacity_factor 2), group 8 -> cap 8: nothing drops
@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize(
    "group_size, cf, train, expected",
    [
        (0, 1.0, True, 8 / 32),
        (4, 1.0, True, 16 / 32),
        (16, 1.0, True, 8 / 32),
        (16, 2.0, True, 0.0),
        (0, 1.0, False, 0.0),
    ],
)
def test_drop_rate_on_hand_built_routing(policy, group_size, cf, train, expected):
    spec = _spec(group_size=group_size, capacity_factor=cf, eval_capacity_factor=2.0, drop_policy=policy)
    block = _hand_routed_block(spec, HAND_LOGITS)
    x = _one_hot_tokens([[CLASS_A] * 8, [CLASS_A] * 4 + [CLASS_C] * 4])
    _, stats = block(x, train=train)
    np.testing.assert_allclose(stats["drop_rate"], expected, rtol=1e-6)
    np.testing.assert_allclose(stats["expert_load"], [12 / 32, 12 / 32, 4 / 32, 4 / 32], rtol=1e-6)


# Groups of 4 tokens B B A A, capacity ceil(1 * 4 * 2 / 4) = 2, all four tokens choose experts 0 and 1.
#   position: the two B tokens come first and take both experts' slots; the A tokens lose both choices.
#   probs: expert 0 keeps the A tokens (their 1st choice, higher probability), expert 1 the B tokens:
#          every token keeps exactly its 1st choice.
@pytest.mark.parametrize(
    "policy, keep_in_group",
    [("position", [[True, True], [True, True], [False, False], [False, False]]), ("probs", [[True, False]] * 4)],
)
def test_which_assignments_drop_by_policy(policy, keep_in_group):
    spec = _spec(group_size=4, capacity_factor=1.0, drop_policy=policy)
    block = _hand_routed_block(spec, HAND_LOGITS)
    x = _one_hot_tokens([[CLASS_B, CLASS_B, CLASS_A, CLASS_A] * 2] * 2)
    y, stats = block(x, train=True)
    keep = np.tile(np.array(keep_in_group), (4, 1))
    np.testing.assert_allclose(y, _np_moe(block, x, keep)[0], **TOL)
    np.testing.assert_allclose(stats["drop_rate"], 0.5, rtol=1e-6)


@pytest.mark.parametrize("impl", ["capacity", "dropless_ragged"])
def test_gradients_match_central_differences(impl):
    # float64 everywhere the block allows; the router (so the combine weights, aux and z-loss)
    # is float32 by design, which puts a few 1e-6 of rounding noise on the loss: ~3e-3 relative in
    # the difference quotient at h = 1e-3, ~1e-4 at h = 2e-2 (measured <= 1e-4 with truncation).
    # rtol 1e-3 keeps a 10x margin; the aux and z terms (weighted to be ~10% of the x-derivative)
    # and any wrong slot or weight gradient would be off by far more. Larger h moves the routing.
    h, rtol = 2e-2, 1e-3
    with jax.enable_x64(True):
        block = _block(_spec(dtype="float64", **IMPLS[impl]))
        graphdef, params = nnx.split(block)
        rng = np.random.default_rng(2)
        x = rng.normal(size=(B, S, D))
        r = rng.normal(size=(B, S, D))

        @jax.jit
        def loss(params, x):
            y, stats = nnx.merge(graphdef, params)(x, train=True)
            aux = router.aux_loss_from_means(stats["mean_probs"], stats["expert_load"], "paper")  # as training takes it
            return jnp.sum(y * r) + 100.0 * aux + 10.0 * stats["z_loss"]

        grad_params, grad_x = jax.grad(loss, argnums=(0, 1))(params, x)

        def top_k_sets(params, x):
            gate = np.asarray(params["gate"][...], np.float64)
            return np.sort(np.argsort(-(x.reshape(-1, D) @ gate), axis=-1)[:, :K], axis=-1)

        def unit(shape):
            v = rng.normal(size=shape)
            return v / np.linalg.norm(v)

        def along(tree, v, step):
            return jax.tree.map(lambda a, b: a + step * b.astype(a.dtype), tree, v)

        def zeros_except(name):
            return jax.tree_util.tree_map_with_path(
                lambda path, a: (
                    unit(a.shape) if any(getattr(p, "key", None) == name for p in path) else np.zeros(a.shape)
                ),
                params,
            )

        routing = top_k_sets(params, x)
        for direction in ("x", "gate", "experts"):
            v_params = zeros_except(direction)
            v_x = unit(x.shape) if direction == "x" else np.zeros(x.shape)
            for step in (h, -h):  # the routing must not move, or the difference quotient is meaningless
                np.testing.assert_array_equal(top_k_sets(along(params, v_params, step), x + step * v_x), routing)
            numeric = (
                loss(along(params, v_params, h), x + h * v_x) - loss(along(params, v_params, -h), x - h * v_x)
            ) / (2 * h)
            analytic = sum(np.vdot(g, v) for g, v in zip(jax.tree.leaves(grad_params), jax.tree.leaves(v_params)))
            analytic += np.vdot(grad_x, v_x)
            assert abs(analytic) > 1e-2, direction  # a direction the loss actually depends on
            np.testing.assert_allclose(analytic, numeric, rtol=rtol, err_msg=direction)


@pytest.mark.parametrize("impl", IMPLS)
def test_identical_experts_equal_the_dense_ffn(impl):
    spec = _spec(**IMPLS[impl])
    dense = _materialize(lambda: SwiGLU(spec, F, nnx.Rngs(params=0)), seed=3)
    block = _block(spec)
    for name in ("w_gate", "w_up", "w_down"):
        w = getattr(dense, name)[...]
        getattr(block.experts, name)[...] = jnp.broadcast_to(w, (E, *w.shape))
    x = _x()
    y, _ = block(x, train=True)
    # Same float32 ops; only the k-way weighted sum (weights summing to 1 within an ulp) differs.
    np.testing.assert_allclose(y, dense(x), rtol=1e-5, atol=1e-5)


def _jnp_per_token_moe(params, x, spec):
    """Each token through its k experts in plain jnp, no sorting, slots or dispatch: the router as router.py
    computes it (gate normalization, float32 softmax, top-k, renormalized) and every assignment's expert weights
    gathered for it, [T, k, d, f]."""
    tokens = x.reshape(-1, D)
    z = tokens @ params["gate"][...]
    z = (
        spec.gate_norm_lambda
        * (z - z.mean(-1, keepdims=True))
        / (jnp.std(z, axis=-1, keepdims=True) + spec.gate_norm_eps)
    )
    weights, chosen = jax.lax.top_k(jax.nn.softmax(z), K)
    weights = weights / weights.sum(-1, keepdims=True)
    w = params["experts"]
    gate = jnp.einsum("td,tkdf->tkf", tokens, w["w_gate"][...][chosen])
    up = jnp.einsum("td,tkdf->tkf", tokens, w["w_up"][...][chosen])
    out = jnp.einsum("tkf,tkfd->tkd", jax.nn.silu(gate) * up, w["w_down"][...][chosen])
    return jnp.einsum("tk,tkd->td", weights, out).reshape(x.shape), chosen


@pytest.mark.parametrize("routing", ["random", "skewed"])
@pytest.mark.parametrize("impl", ["auto", "ragged_xla", "padded"])
def test_dropless_loss_and_gradients_equal_each_token_through_its_experts(monkeypatch, impl, routing):
    """Dropless output, and the gradient of a loss on it for x, the router and every expert weight, against the
    per-token reference. `skewed`: every token picks expert 0 and none picks expert 3, the empty and the full
    group. auto is the CPU kernels on sorted rows (where they build); ragged_xla the same layout through XLA's
    ragged_dot; padded the slot buffers."""
    if impl == "ragged_xla":
        monkeypatch.setattr(cpu_ffi, "available", lambda: False)
    layouts = []  # the rank of each x the CPU kernels' forward is traced with: 2 for sorted rows, 3 for slots
    kernel = cpu_expert_ffn.forward
    monkeypatch.setattr(cpu_expert_ffn, "forward", lambda *a: layouts.append(a[3].ndim) or kernel(*a))
    spec = _spec(dropless=True, dropless_impl=impl.removesuffix("_xla"), capacity_factor=0.5)
    block = _block(spec)
    x = _x()
    if routing == "skewed":
        x[..., 0] = np.abs(x[..., 0]) + 2.0
        gate = np.array(block.gate[...])
        gate[0, 0], gate[0, 3] = 5.0, -5.0
        block.gate[...] = jnp.asarray(gate)
    graphdef, params = nnx.split(block)
    r = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.float32)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x, train=True)[0] * r)

    def reference(params, x):
        return jnp.sum(_jnp_per_token_moe(params, x, spec)[0] * r)

    counts = np.bincount(np.asarray(_jnp_per_token_moe(params, x, spec)[1]).ravel(), minlength=E)
    if routing == "skewed":
        assert counts[0] == B * S and counts[3] == 0
    (got, got_grads), (want, want_grads) = (
        jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x) for f in (loss, reference)
    )
    assert layouts == ([2 if impl == "auto" else 3] if cpu_ffi.available() else [])
    # float32 on both sides, summed in other orders over at most T * k = 32 assignments of O(1) terms (errors of a
    # few 1e-6); a wrong row, expert or combine weight moves them by O(0.1).
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree_util.tree_map_with_path(
        lambda path, a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path)),
        got_grads,
        want_grads,
    )


def _on_mesh(block, x, mesh, layout):
    """(params, x) placed as the runtime places them: experts split over the expert axis, the batch over the
    layout's batch axes, the rest replicated."""
    block.layout = layout
    graphdef, params = nnx.split(block)
    expert_split = jax.NamedSharding(mesh, jax.P("expert"))
    params = jax.tree.map(
        lambda a: jax.device_put(a, expert_split if a.ndim == 3 else jax.NamedSharding(mesh, jax.P())), params
    )
    return graphdef, params, jax.device_put(x, jax.NamedSharding(mesh, jax.P(batch_axes(layout))))


@functools.cache
def _loss_and_grads(graphdef):
    """((loss, (y, drop rate)), gradients) of params, x, r: the layer's output against r, plus its aux and z-losses
    as training weighs them. One compiled program per module structure and mesh, for every batch."""

    def loss(params, x, r):
        y, stats = nnx.merge(graphdef, params)(x, train=True)
        aux = router.aux_loss_from_means(stats["mean_probs"], stats["expert_load"], "paper")
        return jnp.sum(y * r) + 100.0 * aux + 10.0 * stats["z_loss"], (y, stats["drop_rate"])

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


# Dropless under an expert axis exchanges exactly the assigned rows (model/moe/ragged_exchange.py; on the CPU its
# padded fallback). Two batches of 64 tokens: random, and one where every token picks experts 0 and 1 and experts 2
# and 3 get none, which fills the receive buffer of the device holding experts 0 and 1 to its worst case.
@pytest.mark.parametrize("mesh, layout", [((1, 2, 4), "gshard"), ((1, 4, 2), "edp"), ((2, 2, 2), "gshard")])
def test_dropless_under_an_expert_axis_equals_the_dense_reference_and_the_unsharded_gradients(mesh, layout):
    spec = _spec(dropless=True, capacity_factor=0.5)
    rng = np.random.default_rng(4)
    shape = (8, S, D)
    r = rng.normal(size=shape).astype(np.float32)
    skewed = _one_hot_tokens(np.full(shape[:2], CLASS_A)) + 0.05 * rng.normal(size=shape).astype(np.float32)
    devices = jax.make_mesh(mesh, AXES, devices=jax.devices()[:8])
    for block, x in ((_block(spec), _x(shape=shape)), (_hand_routed_block(spec, HAND_LOGITS), skewed)):
        expected, _, experts = _np_moe(block, x)
        graphdef, params = nnx.split(block)
        (loss0, (_, drop0)), grads0 = _loss_and_grads(graphdef)(params, x, r)
        with jax.set_mesh(devices):
            graphdef, params, x = _on_mesh(block, x, devices, layout)
            (loss, (y, drop)), grads = _loss_and_grads(graphdef)(params, x, r)
        np.testing.assert_allclose(y, expected, **TOL)
        assert drop == drop0
        # float32 sums of up to 64 tokens' terms in another order (the weights' gradients add up over devices): a
        # few ulps of the largest term, within 1e-6 of each array's largest value (measured up to 2e-7 of it).
        np.testing.assert_allclose(loss, loss0, rtol=1e-6)
        for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
            np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-6 * np.abs(g0).max())
    assert set(experts.reshape(-1)) == {0, 1}  # the skewed batch routed as intended
