"""Loss-free balancing (training/balance_bias.py): the update rule against numpy on integer counts, including counts
whose float mean rounds onto a neighbour; selection by biased scores with unbiased weights; the bias state equal
on one device and on 8 (an EDP mesh, and a circular uneven pipeline with microbatches) after training steps; a
mid-run checkpoint resumed bit for bit, evaluated, loaded and decoded with its bias; a non-finite step leaves it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_checkpoint import TINY, resumed_at_step_4
from test_parallel import _batch
from test_parallel import _config as _parallel_config
from test_pipeline import _config as _pipeline_config

from skymoe_jax import load_model
from skymoe_jax.cli import main
from skymoe_jax.config import load_config
from skymoe_jax.errors import ConfigError
from skymoe_jax.model.decode import decoding_model, empty_cache, forward_cached
from skymoe_jax.model.moe import router
from skymoe_jax.training import balance_bias
from skymoe_jax.training import runtime as runtime_lib


def _np_sign(counts: np.ndarray) -> np.ndarray:
    """sign(mean - c_j) in int64: mean - c_j has the sign of total - E c_j, which int64 holds exactly here."""
    counts = counts.astype(np.int64)
    return np.sign(counts.sum(-1, keepdims=True) - counts.shape[-1] * counts)


def test_update_matches_numpy_on_random_counts():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 1000, (6, 16)).astype(np.int32)
    counts[0] = 37  # balanced: no move
    counts[1, :8], counts[1, 8:] = 10, 11  # mean 10.5: nobody is at it
    bias = rng.normal(scale=1e-2, size=(6, 16)).astype(np.float32)
    got = balance_bias.update_bias(jnp.asarray(bias), jnp.asarray(counts), 1e-3)
    want = bias + np.float32(1e-3) * _np_sign(counts).astype(np.float32)  # the same float32 ops: bit for bit
    np.testing.assert_array_equal(got, want)
    assert not np.any(np.asarray(got[0]) - bias[0])


@pytest.mark.parametrize(
    "counts,float_dtype",
    [
        ([2**24, 2**24, 2**24 + 1], np.float32),  # 16.8M assignments an expert: float32 holds 2^24 + 1 as 2^24
        ([256, 256, 257, 259], jnp.bfloat16),  # Megatron-LM PR 7081's case: bfloat16 counts above 256
    ],
)
def test_exact_where_a_float_mean_rounds_the_wrong_way(counts, float_dtype):
    counts = np.asarray([counts], np.int64)
    want = _np_sign(counts)
    as_float = jnp.asarray(counts, float_dtype)
    float_sign = np.sign(np.asarray(jnp.mean(as_float, axis=-1, keepdims=True) - as_float, np.float64))
    assert np.any(float_sign != want)  # the float way gets this case wrong...
    got = balance_bias.load_error_sign(jnp.asarray(counts, jnp.int32))
    np.testing.assert_array_equal(got, want)  # ...and the integer one right


def test_bias_picks_the_experts_and_the_unbiased_probabilities_weigh_them():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(32, 8)).astype(np.float32)
    bias = rng.normal(scale=0.1, size=8).astype(np.float32)
    r = router.route(jnp.asarray(z), 2, gate_norm=True, bias=jnp.asarray(bias))
    plain = router.route(jnp.asarray(z), 2, gate_norm=True)
    np.testing.assert_array_equal(r.probs, plain.probs)
    probs = np.asarray(plain.probs)
    chosen = np.argsort(-(probs + bias), axis=-1, kind="stable")[:, :2]  # float32 sums, as the router adds them
    np.testing.assert_array_equal(r.experts, chosen)
    picked = np.take_along_axis(probs, chosen, axis=-1)
    np.testing.assert_allclose(r.weights, picked / picked.sum(-1, keepdims=True), rtol=1e-6)
    assert np.any(np.asarray(r.experts) != np.asarray(plain.experts))  # the bias changed some choices


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["--config.moe.balance=loss_free"], "moe.balance='loss_free' is not one of aux, bias, aux+bias"),
        (["--config.moe.bias_update_rate=0"], "moe.bias_update_rate=0.0 must be > 0"),
        (["--config.moe.balance=bias", "--config.moe.routing_impl=pallas"], "set moe.routing_impl=xla"),
    ],
)
def test_bad_balance_settings_are_one_sentence(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config("configs/default.py", overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def _train(c, devices, steps):
    """The bias after each of `steps` train steps on the same batch, and the last metrics."""
    rt = runtime_lib.build(c, devices)
    biases = []
    with jax.set_mesh(rt.mesh):
        state, batch = rt.init(), rt.batch(_batch(c))
        for _ in range(steps):
            state, metrics = rt.train_step(state, batch)
            biases.append(np.asarray(jax.device_get(state.bias)))
    assert np.array_equal(biases[-1], np.asarray(jax.device_get(metrics["expert_bias"])))
    return np.stack(biases), jax.device_get(metrics)


def test_bias_is_equal_on_one_device_and_on_an_edp_mesh_after_20_steps():
    c = lambda mesh: _parallel_config(mesh, "edp", balance="bias")
    one, m1 = _train(c((1, 1, 1)), jax.devices()[:1], 20)
    eight, m8 = _train(c((1, 4, 2)), jax.devices(), 20)
    assert np.count_nonzero(one[-1]) > one[-1].size // 2  # it moved
    np.testing.assert_array_equal(eight, one)
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    assert m1["aux_loss"] == 0 and np.all(m1["layer_aux_loss"] > 0)  # reported, not in the loss


def test_a_non_finite_step_leaves_the_bias_as_it_was():
    c = _parallel_config(balance="bias")
    rt = runtime_lib.build(c, jax.devices()[:1])
    with jax.set_mesh(rt.mesh):
        state, batch = rt.init(), _batch(c)
        state, _ = rt.train_step(state, rt.batch(batch))
        before = np.asarray(jax.device_get(state.bias))
        state, metrics = rt.train_step(
            state, rt.batch({**batch, "loss_mask": np.full_like(batch["loss_mask"], np.nan)})
        )
    assert not metrics["finite"] and np.any(before)
    np.testing.assert_array_equal(jax.device_get(state.bias), before)


def _with_bias(c):
    c.moe.balance = "aux+bias"
    return c


def test_pipelined_bias_equals_the_unpipelined_one():
    """A circular schedule with uneven chunks, 4 microbatches, data and expert axes in the EDP layout."""
    steps = 3  # the bias is 0 in the first step: two more route by it
    one, m1 = _train(_with_bias(_pipeline_config()), jax.devices()[:1], steps)
    c = _with_bias(_pipeline_config((2, 2, 2), (1, 2, 2, 1), microbatches=4, layout="edp"))
    c.parallel.pipeline_repeats = 2
    piped, mp = _train(c, jax.devices(), steps)
    np.testing.assert_array_equal(piped, one)
    np.testing.assert_array_equal(mp["drop_rate"], m1["drop_rate"])
    np.testing.assert_allclose(mp["loss"], m1["loss"], rtol=1e-5)


def test_balance_bias_run_resumes_bit_for_bit_and_evaluates(tmp_path, capsys):
    flags = ["--config.moe.balance=bias", "--config.moe.bias_update_rate=0.01"]
    a, b, resumed = resumed_at_step_4(tmp_path, flags, capsys)
    for step in range(5, 9):
        for key in ("loss", "expert_bias", "expert_load", "alpha"):
            assert a[step][key] == b[step][key], (step, key)
    assert np.ptp(a[8]["expert_bias"]) > 0
    capsys.readouterr()
    assert main(["eval", f"--workdir={resumed}", "--json"]) == 0
    assert '"step": 8' in capsys.readouterr().out

    # The loaded model, and the one sampling decodes with, route with the run's last bias.
    model, _ = load_model(str(resumed), device=jax.local_devices()[0])
    np.testing.assert_array_equal(model.selection_bias[...], np.asarray(a[8]["expert_bias"], np.float32))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 32)), jnp.int32)
    logits = jax.jit(lambda m, t, b=None: m(t, bias=b).logits)
    unbiased = logits(model, tokens, jnp.zeros_like(model.selection_bias[...]))
    assert not np.allclose(logits(model, tokens), unbiased, atol=1e-3)  # the bias changes some experts
    decoding = decoding_model(model)
    want = logits(decoding, tokens)
    got, _ = jax.jit(forward_cached)(decoding, tokens, jnp.int32(0), empty_cache(decoding, 2, 32))
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=0)  # as test_sample's cached-against-uncached check
    assert not np.allclose(want, logits(decoding, tokens, jnp.zeros_like(model.selection_bias[...])), atol=1e-3)


def test_an_aux_checkpoint_resumed_with_a_bias_is_refused_in_one_sentence(tmp_path, capsys):
    flags = [*TINY, "--config.train.checkpoint_every=3", "--config.train.steps=3"]
    assert main(["train", f"--workdir={tmp_path}", *flags]) == 0
    capsys.readouterr()
    assert main(["train", f"--workdir={tmp_path}", *flags, "--config.train.steps=4", "--config.moe.balance=bias"]) == 2
    err = capsys.readouterr().err
    assert "holds no expert selection bias" in err and "moe.balance=aux" in err and len(err.strip().splitlines()) == 1
