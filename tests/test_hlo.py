"""bench/hlo.py against programs whose counts are known by hand: matmul FLOPs and collectives weighted by loop
trip counts, host callbacks found; and `skymoe params --compile` printing them."""

import json

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from skymoe_jax.bench import hlo
from skymoe_jax.cli import main
from skymoe_jax.config import load_config
from skymoe_jax.parallel.plan import plan
from skymoe_jax.training.compiled import compile_train_step


def _compiled_text(f, *args) -> str:
    return jax.jit(f).lower(*args).compile().as_text()


def test_a_loop_of_matmuls_and_all_reduces_is_counted_per_trip():
    """Seven steps of a [64, 64] @ [64, 64] matmul summed over 8 devices: 7 x 2 x 64^3 FLOPs and 7 all-reduces of
    64 x 64 float32 per device, though XLA prints the loop's body once."""
    mesh = jax.make_mesh((8,), ("d",))

    def body(x, w):
        def step(c, _):
            return c + jax.lax.psum(c @ w, "d"), None

        return jax.lax.scan(step, x, None, length=7)[0]

    f = jax.shard_map(body, mesh=mesh, in_specs=(P("d"), P()), out_specs=P("d"))
    x = jax.ShapeDtypeStruct((8 * 64, 64), jnp.float32, sharding=NamedSharding(mesh, P("d")))
    w = jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=NamedSharding(mesh, P()))
    s = hlo.summarize(_compiled_text(f, x, w))
    assert s.flops == 7 * 2 * 64**3
    assert all(d.lhs == d.rhs == "f32" for d in s.dots)
    assert s.collectives == {"all-reduce": {"count": 7, "bytes": 7 * 64 * 64 * 4}}
    assert not s.host_transfers


def test_a_host_callback_is_found():
    def f(x):
        jax.debug.callback(lambda v: None, x)
        return x @ x

    s = hlo.summarize(_compiled_text(f, jax.ShapeDtypeStruct((16, 16), jnp.float32)))
    assert s.host_transfers and "callback" in s.host_transfers[0]
    assert s.flops == 2 * 16**3


def test_params_compile_prints_what_the_program_does(capsys):
    assert main(["params", "--mesh=1,4,2", "--compile=cpu", "--json"]) == 0
    compiled = json.loads(capsys.readouterr().out)["compiled"]
    assert compiled["matmul_flops"] > 0 and compiled["temp_bytes"] > 0
    assert compiled["collectives"]["all-to-all"]["count"] > 0  # the MoE layers' exchange over the expert axis
    assert compiled["host_transfers"] == []


@pytest.mark.parametrize("remat", ["none", "dots", "full"])
def test_the_planned_all_to_all_is_what_the_compiled_step_exchanges(remat):
    """The planner's all-to-all bytes (what a device sends, (E - 1) / E of each exchange) against the exchanges in
    the compiled step's HLO, on the default config with an expert axis of 2, under each remat policy (`dots`
    recomputes the exchange, as `full` does)."""
    c = load_config("configs/default.py", ["--config.parallel.mesh=(1,4,2)", f"--config.model.remat={remat}"])
    exchanged = hlo.summarize(compile_train_step(c, jax.devices()).compiled.as_text()).collectives["all-to-all"]
    planned = plan(c, (1, 4, 2)).all_to_all_bytes * 2  # sent = half of each exchange on 2 devices
    # The CPU kernels also exchange each group's counts of rows in use, [experts, groups] int32 (a few KiB).
    assert planned <= exchanged["bytes"] <= 1.01 * planned
