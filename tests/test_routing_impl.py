"""moe.routing_impl end to end: the MoE block and a train step with the Pallas kernels
(interpret mode on this CPU), inside a pipelined expert-parallel step too, equal the XLA path; inside
a device mesh the kernels lower to Triton for CUDA; `skymoe bench routing` runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from skymoe_jax.cli import main
from skymoe_jax.config import apply_overrides, base_config
from skymoe_jax.errors import ConfigError
from skymoe_jax.kernels import common
from skymoe_jax.model.moe import router
from skymoe_jax.model.moe.block import MoEBlock
from skymoe_jax.model.spec import ModelSpec
from skymoe_jax.training import runtime as runtime_lib


def test_routing_impl_config():
    c = base_config()
    assert c.moe.routing_impl == "auto" and ModelSpec.from_config(c).routing_impl == "auto"
    c = apply_overrides(c, ["--config.moe.routing_impl=pallas"])
    assert ModelSpec.from_config(c).routing_impl == "pallas"
    with pytest.raises(ConfigError, match="moe.routing_impl='triton' is not one of auto, xla, pallas"):
        apply_overrides(c, ["--config.moe.routing_impl=triton"])


def test_auto_is_xla_even_on_a_gpu(monkeypatch):
    """The kernels have not passed `skymoe acceptance` on a GPU yet: auto must not pick them there."""
    from skymoe_jax.kernels.ops import XLA_OPS, routing_ops

    monkeypatch.setattr(common, "on_gpu", lambda: True)
    assert routing_ops("auto") is XLA_OPS
    assert routing_ops("pallas").route is not XLA_OPS.route


def _block_spec(routing_impl, **moe) -> ModelSpec:
    c = base_config()
    c.model.d_model = 32
    c.moe.update(
        {"num_experts": 8, "top_k": 2, "expert_ffn_dim": 16, "group_size": 0, "routing_impl": routing_impl, **moe}
    )
    c.data.seq_len = 24
    return ModelSpec.from_config(c)


def _block(spec):
    """Parameters drawn with numpy: the same for both implementations, and no RNG program to compile."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: MoEBlock(spec, nnx.Rngs(params=0), "gshard")))
    rng = np.random.default_rng(0)
    return nnx.merge(graphdef, jax.tree.map(lambda a: (0.5 * rng.normal(size=a.shape)).astype(a.dtype), abstract))


@pytest.mark.parametrize(
    "moe",
    [
        dict(capacity_factor=0.75),  # position policy, drops
        dict(capacity_factor=0.75, group_size=8),  # three routing groups per sequence
        dict(capacity_factor=0.75, drop_policy="probs"),  # positions on the XLA path, the rest Pallas
        dict(dropless=True, dropless_impl="padded"),
        dict(gate_norm=False, renormalize=False, top_k=4),
        dict(capacity_factor=0.75, score="sigmoid", routed_scale=2.5),
    ],
    ids=["position", "groups", "probs", "dropless", "plain-top4", "sigmoid"],
)
def test_block_pallas_equals_xla(moe):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 24, 32)).astype(np.float32))

    def run(impl):
        block = _block(_block_spec(impl, **moe))

        def loss(block, x):
            y, stats = block(x, train=True)
            aux = router.aux_loss_from_means(stats["mean_probs"], stats["expert_load"], "paper")
            return jnp.sum(y * jnp.cos(y)) + aux + stats["z_loss"], (y, stats)

        (_, (y, stats)), (g_block, g_x) = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))(block, x)
        return y, stats, jax.tree.leaves(nnx.state(g_block)), g_x

    (y, stats, g, g_x), (y0, stats0, g0, g_x0) = run("pallas"), run("xla")
    np.testing.assert_array_equal(stats["drop_rate"], stats0["drop_rate"])
    np.testing.assert_array_equal(stats["expert_load"], stats0["expert_load"])
    if "dropless" not in moe and moe.get("capacity_factor"):
        assert float(stats0["drop_rate"]) > 0
    # float32 sums in another order, then through the expert FFN and its backward pass.
    for name in ("mean_probs", "z_loss", "max1_max2", "router_entropy"):
        np.testing.assert_allclose(stats[name], stats0[name], rtol=1e-6)
    np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5 * np.max(np.abs(y0)))
    for a, b in zip(g + [g_x], g0 + [g_x0]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.max(np.abs(b)))


def _train_config(routing_impl, mesh=(1, 1, 1), layout="gshard"):
    c = base_config()
    c.model.update(d_model=32, num_layers=mesh[0], num_heads=4, num_kv_heads=2, ffn_dim=64, vocab_size=64)
    c.moe.update(
        num_experts=8, top_k=2, expert_ffn_dim=16, group_size=16, capacity_factor=0.75, routing_impl=routing_impl
    )
    c.data.update(seq_len=16, batch_size=8)
    c.optim.warmup_steps = 0
    c.parallel.update(mesh=mesh, layout=layout)
    return c


def _batch(c):
    rng = np.random.default_rng(0)
    b, s = c.data.batch_size, c.data.seq_len
    tokens = rng.integers(0, c.model.vocab_size, (b, s + 1)).astype(np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
        "segment_ids": np.ones((b, s), np.int32),
        "loss_mask": np.ones((b, s), np.float32),
    }


def _step_metrics_and_params(c, initial=None):
    """One train step through the runtime (sharded jit, the MoE layer in shard_map)."""
    rt = runtime_lib.build(c)
    with jax.set_mesh(rt.mesh):
        state = rt.init() if initial is None else jax.device_put(initial, rt.shardings)
        start = jax.device_get(state)  # the step donates its input state
        new_state, metrics = rt.train_step(state, rt.batch(_batch(c)))
        return start, jax.device_get((new_state.params, metrics))


def test_train_step_pallas_equals_xla():
    """A whole train step with the interpreted kernels inside expert parallelism (all-to-all over
    expert=2) within a 2-stage pipeline (mesh 2x2x2)."""
    mesh = (2, 2, 2)
    initial, (params0, metrics0) = _step_metrics_and_params(_train_config("xla", mesh))
    # routing_impl is no part of the state, so both steps start from the same one.
    _, (params, metrics) = _step_metrics_and_params(_train_config("pallas", mesh), initial)
    np.testing.assert_array_equal(metrics["drop_rate"], metrics0["drop_rate"])
    assert np.all(metrics0["drop_rate"] > 0)
    np.testing.assert_array_equal(metrics["expert_load"], metrics0["expert_load"])
    np.testing.assert_allclose(metrics["loss"], metrics0["loss"], rtol=2e-6)
    np.testing.assert_allclose(metrics["grad_norm"], metrics0["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(metrics["alpha"], metrics0["alpha"], rtol=1e-6)
    for p, p0 in zip(jax.tree.leaves(params), jax.tree.leaves(params0)):
        np.testing.assert_allclose(p, p0, atol=1e-5)  # Adam moves each by ~lr*sign(g): a flip shows as 2*lr


@pytest.mark.parametrize("layout", ["gshard", "edp"])
def test_sharded_train_step_lowers_triton_kernels_for_cuda(monkeypatch, layout):
    """Expert parallelism (mesh 1x2x4, all-to-all) with the compiled kernels, as on a GPU: every
    kernel, forward and backward, lowers inside shard_map."""
    monkeypatch.setattr(common, "on_gpu", lambda: True)
    c = _train_config("pallas", mesh=(1, 2, 4), layout=layout)
    rt = runtime_lib.build(c)
    with jax.set_mesh(rt.mesh):
        text = (
            rt.train_step.trace(jax.eval_shape(rt.init), rt.batch(_batch(c)))
            .lower(lowering_platforms=("cuda",))
            .as_text()
        )
    assert "all_to_all" in text
    kernels = {chunk.split('name = "', 1)[1].split('"', 1)[0] for chunk in text.split("__gpu$xla.gpu.triton")[1:]}
    assert kernels == {
        "skymoe_route",
        "skymoe_route_bwd",
        "skymoe_expert_counts",
        "skymoe_expert_ranks",
        "skymoe_slot_sources",
        "skymoe_gather_rows",
        "skymoe_gather_sum",
        "skymoe_gather_dot",
    }


def test_bench_routing_and_ragged(capsys):
    shape = ["--tokens=200", "--width=32", "--experts=8", "--top_k=2", "--repeats=1"]
    assert main(["bench", "routing", *shape]) == 0
    out = capsys.readouterr().out
    assert "INTERPRET mode" in out
    for stage in ("route", "positions", "dispatch", "combine", "sum"):
        assert out.count(f" {stage} ") == 2, stage  # an xla and a pallas row
    assert main(["bench", "routing", "--ragged", *shape]) == 0
    out = capsys.readouterr().out
    assert "ragged" in out and "padded" in out
    assert main(["bench", "routing", "--tokens=200"]) == 2
