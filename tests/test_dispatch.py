"""Dispatch (skymoe_jax/model/moe/dispatch.py) on hand-written routings with hand-computed
slots and drops, plus a plain-Python reference of both drop policies on random routings."""

import jax
import numpy as np
import pytest

from skymoe_jax.model.moe import dispatch

# 4 tokens, top-2, 3 experts. Assignments per expert, token-major:
#   expert 0: t0 (1st choice), t2 (1st), t3 (2nd)
#   expert 1: t0 (2nd), t1 (1st), t2 (2nd), t3 (1st)
#   expert 2: t1 (2nd)
EXPERTS = np.array([[0, 1], [1, 2], [0, 1], [1, 0]], np.int32)
COUNTS = [3, 4, 1]
# Position policy: rank = number of earlier assignments to the same expert.
POSITIONS_BY_TOKEN = np.array([[0, 0], [1, 0], [1, 2], [3, 2]])
# Probs policy, higher priority first and ties by token order:
#   expert 0: t0 (0.6), t2 (0.6, tie -> after t0), t3 (0.1)
#   expert 1: t3 (0.9), t1 (0.7), t0 (0.4), t2 (0.4, tie -> after t0)
PRIORITY = np.array([[0.6, 0.4], [0.7, 0.3], [0.6, 0.4], [0.9, 0.1]], np.float32)
POSITIONS_BY_PRIORITY = np.array([[0, 2], [1, 0], [1, 3], [0, 2]])
# Capacity 2 keeps ranks 0 and 1; slot = expert * 2 + rank. Both policies drop 3 = (3-2) + (4-2) + 0.
SLOTS_BY_TOKEN = np.array([[0, 2], [3, 4], [1, -1], [-1, -1]])
SLOTS_BY_PRIORITY = np.array([[0, -1], [3, 4], [1, -1], [2, -1]])


def test_expert_positions_token_order():
    slots = dispatch.expert_positions(EXPERTS, 3)
    np.testing.assert_array_equal(slots.positions, POSITIONS_BY_TOKEN)
    np.testing.assert_array_equal(slots.counts, COUNTS)


def test_expert_positions_by_priority():
    slots = dispatch.expert_positions(EXPERTS, 3, PRIORITY)
    np.testing.assert_array_equal(slots.positions, POSITIONS_BY_PRIORITY)
    np.testing.assert_array_equal(slots.counts, COUNTS)


@pytest.mark.parametrize(
    "positions, expected", [(POSITIONS_BY_TOKEN, SLOTS_BY_TOKEN), (POSITIONS_BY_PRIORITY, SLOTS_BY_PRIORITY)]
)
def test_slot_indices_drop_beyond_capacity(positions, expected):
    slots = np.asarray(dispatch.slot_indices(EXPERTS, positions, 2))
    np.testing.assert_array_equal(slots, expected)
    assert np.sum(slots < 0) == 3


def _reference_positions(experts, priority=None):
    """Walk the assignments in policy order and hand out each expert's next free rank."""
    flat = experts.ravel()
    prio = np.zeros(flat.shape) if priority is None else priority.ravel()
    positions = np.empty(flat.shape, np.int64)
    taken = {}
    for i in sorted(range(flat.size), key=lambda i: (-prio[i], i)):
        positions[i] = taken.get(flat[i], 0)
        taken[flat[i]] = positions[i] + 1
    return positions.reshape(experts.shape)


@pytest.mark.parametrize("with_priority", [False, True])
def test_expert_positions_match_reference_on_random_routing(with_priority):
    rng = np.random.default_rng(0)
    experts = np.stack([rng.permutation(5)[:2] for _ in range(32)]).astype(np.int32)
    # Priorities on a coarse grid, so ties (broken by token order) are common.
    priority = (rng.integers(0, 4, size=experts.shape) / 4).astype(np.float32) if with_priority else None
    slots = dispatch.expert_positions(experts, 5, priority)
    np.testing.assert_array_equal(slots.positions, _reference_positions(experts, priority))
    np.testing.assert_array_equal(slots.counts, np.bincount(experts.ravel(), minlength=5))


def test_dispatch_and_combine_by_hand():
    x = np.arange(1, 13, dtype=np.float32).reshape(4, 3)  # distinct nonzero rows
    buf = np.asarray(dispatch.dispatch(x, SLOTS_BY_TOKEN, 6))
    # Slot s holds the token whose assignment got slot s (see SLOTS_BY_TOKEN); slot 5 (expert 2, rank 1) is empty.
    np.testing.assert_array_equal(buf, [x[0], x[2], x[0], x[1], x[1], np.zeros(3)])

    # A different scale per slot stands in for the experts, so a wrong slot shows in the sum.
    y = buf * (1.0 + np.arange(6, dtype=np.float32))[:, None]
    w = np.array([[0.7, 0.3], [0.6, 0.4], [0.8, 0.2], [0.5, 0.5]], np.float32)
    expected = np.zeros_like(x)
    for t in range(4):
        for j in range(2):
            if SLOTS_BY_TOKEN[t, j] >= 0:
                expected[t] += w[t, j] * (1.0 + SLOTS_BY_TOKEN[t, j]) * x[t]
    np.testing.assert_allclose(dispatch.combine(y, SLOTS_BY_TOKEN, w), expected, rtol=1e-6)
    np.testing.assert_array_equal(expected[3], 0.0)  # both of t3's assignments were dropped


def test_sorted_dispatch_round_trip():
    rng = np.random.default_rng(1)
    t, k, e, d = 8, 2, 4, 3
    experts = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    x = rng.normal(size=(t, d)).astype(np.float32)
    w = rng.uniform(size=(t, k)).astype(np.float32)
    order = dispatch.sort_by_expert(experts, e)
    sizes = np.bincount(experts.ravel(), minlength=e)
    np.testing.assert_array_equal(order.group_sizes, sizes)

    rows = np.asarray(dispatch.gather_sorted(x, order, k))
    expected_rows = [x[tok] for ex in range(e) for tok in range(t) for j in range(k) if experts[tok, j] == ex]
    np.testing.assert_array_equal(rows, expected_rows)

    # Scale each row by (1 + its expert) as a stand-in expert; combine must route it back to its token.
    y = rows * (1.0 + np.repeat(np.arange(e), sizes))[:, None].astype(np.float32)
    expected = np.einsum("tk,td->td", w * (1.0 + experts), x)
    np.testing.assert_allclose(dispatch.combine_sorted(y, order, w), expected, rtol=1e-6)


def test_sorted_gather_and_combine_gradients_match_loops():
    """Their custom gradients (gathers through the inverse permutation) against the transposes written as loops
    over the assignments: a token's gradient sums its assignments' rows; a sorted row's is its token's output
    gradient times its weight; a weight's is the dot of its token's output gradient with its row."""
    rng = np.random.default_rng(2)
    t, k, e, d = 8, 2, 4, 3
    experts = 1 + np.stack([rng.permutation(e - 1)[:k] for _ in range(t)]).astype(np.int32)  # expert 0 gets none
    x, d_out = rng.normal(size=(2, t, d)).astype(np.float32)
    y, d_rows = rng.normal(size=(2, t * k, d)).astype(np.float32)
    w = rng.uniform(size=(t, k)).astype(np.float32)
    order = dispatch.sort_by_expert(experts, e)
    sorted_pos = {int(a): i for i, a in enumerate(np.asarray(order.order))}  # assignment -> its sorted row

    (d_x,) = jax.vjp(lambda x: dispatch.gather_sorted(x, order, k), x)[1](d_rows)
    want_x = np.zeros_like(x)
    for a, i in sorted_pos.items():
        want_x[a // k] += d_rows[i]
    np.testing.assert_allclose(d_x, want_x, rtol=1e-6)

    d_y, d_w = jax.vjp(lambda y, w: dispatch.combine_sorted(y, order, w), y, w)[1](d_out)
    want_y, want_w = np.zeros_like(y), np.zeros_like(w)
    for a, i in sorted_pos.items():
        want_y[i] = w[a // k, a % k] * d_out[a // k]
        want_w[a // k, a % k] = d_out[a // k] @ y[i]
    np.testing.assert_allclose(d_y, want_y, rtol=1e-6)
    np.testing.assert_allclose(d_w, want_w, rtol=1e-5)
