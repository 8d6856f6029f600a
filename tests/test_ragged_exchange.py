"""Dropless under an expert axis (skymoe_jax/model/moe/ragged_exchange.py, block.py's RaggedExchangeDispatcher): what
each device sends where, counted from a routed batch against numpy; the CPU's padded transport against
ragged_all_to_all's documented semantics in numpy; the regrouping by local expert against a loop. The layer's
results against the dense reference are in test_moe_block.py, the step's in test_parallel.py, its XLA:GPU program in
test_gpu_compile.py."""

import jax
import jax.numpy as jnp
import numpy as np
from test_moe_block import D, E, K, _block, _np_routing, _spec, _x

from skymoe_jax.kernels.ops import routing_ops
from skymoe_jax.model.moe import ragged_exchange
from skymoe_jax.model.moe.block import RaggedExchangeDispatcher, route

EP = 4  # devices of the expert axis, one expert each (E = 4)


def _over_devices(fn, *arrays):
    """fn on each device's share of arrays (split on their first axis over EP devices), the results stacked."""
    mesh = jax.make_mesh((EP,), ("expert",), devices=jax.devices()[:EP])
    split = jax.NamedSharding(mesh, jax.P("expert"))
    shares = [jax.device_put(a, split) for a in arrays]
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=jax.P("expert"), out_specs=jax.P("expert")))(*shares)


def test_each_device_sends_exactly_its_assigned_rows():
    """From a routed batch of 16 tokens per device: device i sends device j the rows of its tokens' choices among
    j's experts, and its payload is k x tokens rows of d_model values whatever the balance."""
    spec = _spec(dropless=True)
    block = _block(spec)
    x = _x(shape=(EP * 16, D))
    gate = block.gate[...]

    def sends(tokens):
        routing = route(tokens, gate, spec, routing_ops(spec.routing_impl))
        _, counts, (forward, backward) = RaggedExchangeDispatcher(E, "expert").exchange(routing.experts)
        return forward.send_sizes[None], forward.recv_sizes[None], backward.send_sizes[None], counts[None]

    send, recv, back, counts = map(np.asarray, _over_devices(sends, x))

    _, experts, _ = _np_routing(x.astype(np.float64), np.asarray(gate, np.float64), spec)
    local = E // EP
    expected = np.zeros((EP, EP), int)  # [source, destination]
    for source in range(EP):
        for e in experts[source * 16 : (source + 1) * 16].reshape(-1):
            expected[source, e // local] += 1
    np.testing.assert_array_equal(send, expected)
    np.testing.assert_array_equal(recv, expected.T)  # each device receives what the others send it
    np.testing.assert_array_equal(back, expected.T)  # and sends it back
    assert len(set(expected.reshape(-1))) > 1  # a batch that is not evenly spread
    bytes_sent = send.sum(1) * D * 4
    np.testing.assert_array_equal(bytes_sent, K * 16 * D * 4)
    for device_counts in counts:  # every device sees every device's counts
        np.testing.assert_array_equal(device_counts.sum(-1), expected)


def _np_ragged_all_to_all(operands, outputs, input_offsets, send_sizes, output_offsets, recv_sizes):
    """jax.lax.ragged_all_to_all's semantics as its docstring writes them, one slice per peer, over every device."""
    results = [o.copy() for o in outputs]
    n = len(operands)
    for i in range(n):
        for j in range(n):
            rows = operands[i][input_offsets[i][j] : input_offsets[i][j] + send_sizes[i][j]]
            assert len(rows) == recv_sizes[j][i]
            results[j][output_offsets[i][j] : output_offsets[i][j] + len(rows)] = rows
    return results


def test_padded_transport_has_ragged_all_to_all_semantics():
    """Slices at offsets with gaps between them, written at gapped offsets, the rest of `output` kept."""
    rng = np.random.default_rng(0)
    chunk, rows = 3, 20
    send = rng.integers(0, chunk + 1, (EP, EP))  # [source, destination]
    input_offsets = np.cumsum(send + 1, axis=1) - (send + 1)  # a row of gap after each slice
    output_offsets = np.cumsum(send, axis=0) - send + np.arange(EP)[:, None]  # packed, then one more gap a source
    operands = rng.normal(size=(EP, rows, 2)).astype(np.float32)
    outputs = rng.normal(size=(EP, rows, 2)).astype(np.float32)
    expected = _np_ragged_all_to_all(operands, outputs, input_offsets, send, output_offsets, send.T)

    def padded(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes):
        exchange = ragged_exchange.Exchange(input_offsets[0], send_sizes[0], output_offsets[0], recv_sizes[0])
        return ragged_exchange.padded_all_to_all(operand[0], output[0], exchange, axis_name="expert", chunk=chunk)[None]

    as32 = lambda a: jnp.asarray(a, jnp.int32)  # noqa: E731
    result = _over_devices(
        padded, operands, outputs, as32(input_offsets), as32(send), as32(output_offsets), as32(send.T)
    )
    np.testing.assert_array_equal(result, np.stack(expected))


def test_regroup_orders_received_rows_by_local_expert():
    """Rows packed by source, then expert ([source, expert] counts), some sources sending an expert nothing, in a
    buffer with unused rows at its end."""
    counts = np.array([[2, 0, 1], [0, 0, 3], [1, 2, 0]])
    rows = 12
    source_expert = [(i, e) for i in range(3) for e in range(3) for _ in range(counts[i, e])]
    grouped = sorted(range(len(source_expert)), key=lambda r: (source_expert[r][1], source_expert[r][0]))
    expected = np.arange(rows)
    expected[grouped] = np.arange(len(grouped))
    position, sizes = jax.jit(ragged_exchange.regroup, static_argnums=1)(jnp.asarray(counts, jnp.int32), rows)
    np.testing.assert_array_equal(position, expected)
    np.testing.assert_array_equal(sizes, counts.sum(0))
