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
    assert 0 < compiled["eval"]["temp_bytes"] < compiled["temp_bytes"]  # no gradients, no optimizer update
    assert compiled["collectives"]["all-to-all"]["count"] > 0  # the MoE layers' exchange over the expert axis
    assert compiled["host_transfers"] == []


@pytest.mark.parametrize("remat, dropless", [("none", False), ("dots", True), ("full", False)])
def test_the_planned_all_to_all_is_what_the_compiled_step_exchanges(remat, dropless):
    """The planner's all-to-all bytes (what a device sends, (E - 1) / E of each exchange) against the exchanges in
    the compiled step's HLO, on the default config with an expert axis of 2, under each remat policy (`dots`
    recomputes the exchange, as `full` does); dropless, the CPU's padded exchange of the assigned rows."""
    c = load_config(
        "configs/default.py",
        ["--config.parallel.mesh=(1,4,2)", f"--config.model.remat={remat}", f"--config.moe.dropless={dropless}"],
    )
    exchanged = hlo.summarize(compile_train_step(c, jax.devices()).compiled.as_text()).collectives["all-to-all"]
    planned = plan(c, (1, 4, 2)).all_to_all_bytes * 2  # sent = half of each exchange on 2 devices
    # The CPU kernels also exchange each group's counts of rows in use, [experts, groups] int32 (a few KiB); the
    # dropless exchange the offsets where each device's rows land, [devices] int32.
    assert planned <= exchanged["bytes"] <= 1.01 * planned


# A loop over the 8 rows of a stacked [8, 256] float32 weight: a fusion reads row i (a dynamic slice), squares it,
# and a second fusion writes it into row i of the output in place, as a layer scan reads and writes its stacks.
LOOP_HLO = """HloModule loop

%fused_slice (param_0: f32[8,256], param_1: s32[]) -> f32[1,256] {
  %param_0 = f32[8,256]{1,0} parameter(0)
  %bitcast = f32[8,256]{1,0} bitcast(%param_0)
  %param_1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  ROOT %row = f32[1,256]{1,0} dynamic-slice(%bitcast, %param_1, %zero), dynamic_slice_sizes={1,256}
}

%fused_update (param_0.1: f32[8,256], param_1.1: f32[1,256], param_2: s32[]) -> f32[8,256] {
  %param_0.1 = f32[8,256]{1,0} parameter(0)
  %param_1.1 = f32[1,256]{1,0} parameter(1)
  %param_2 = s32[] parameter(2)
  %zero.1 = s32[] constant(0)
  ROOT %update = f32[8,256]{1,0} dynamic-update-slice(%param_0.1, %param_1.1, %param_2, %zero.1)
}

%body (state: (s32[], f32[8,256], f32[8,256])) -> (s32[], f32[8,256], f32[8,256]) {
  %state = (s32[], f32[8,256]{1,0}, f32[8,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %w = f32[8,256]{1,0} get-tuple-element(%state), index=1
  %out = f32[8,256]{1,0} get-tuple-element(%state), index=2
  %row = f32[1,256]{1,0} fusion(%w, %i), kind=kLoop, calls=%fused_slice
  %squared = f32[1,256]{1,0} multiply(%row, %row)
  %new = f32[8,256]{1,0} fusion(%out, %squared, %i), kind=kLoop, calls=%fused_update
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %result = (s32[], f32[8,256]{1,0}, f32[8,256]{1,0}) tuple(%next, %w, %new)
}

%condition (state.1: (s32[], f32[8,256], f32[8,256])) -> pred[] {
  %state.1 = (s32[], f32[8,256]{1,0}, f32[8,256]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%state.1), index=0
  %eight = s32[] constant(8)
  ROOT %more = pred[] compare(%i.1, %eight), direction=LT
}

ENTRY %main (w.1: f32[8,256], out.1: f32[8,256]) -> f32[8,256] {
  %w.1 = f32[8,256]{1,0} parameter(0)
  %out.1 = f32[8,256]{1,0} parameter(1)
  %start = s32[] constant(0)
  %init = (s32[], f32[8,256]{1,0}, f32[8,256]{1,0}) tuple(%start, %w.1, %out.1)
  %loop = (s32[], f32[8,256]{1,0}, f32[8,256]{1,0}) while(%init), condition=%condition, body=%body, TRIP_COUNT
  ROOT %final = f32[8,256]{1,0} get-tuple-element(%loop), index=2
}
""".replace("TRIP_COUNT", 'backend_config={"known_trip_count":{"n":"8"}}')


def test_memory_traffic_counts_the_rows_a_loop_slices_and_updates_not_the_stacks():
    row, index = 256 * 4, 4
    slice_fusion = row + index + row  # row i and the index in, the row out
    multiply = 2 * row + row  # its two operands in, its result out
    update_fusion = row + index + row  # the new row and the index in, the row written in place
    counter = 3 * index  # the loop counter's add: two s32 in, one out
    per_trip = slice_fusion + multiply + update_fusion + counter
    condition = 2 * index + 1  # a compare of two s32 into a pred, run once more than the body
    assert hlo.summarize(LOOP_HLO).memory_bytes == 8 * per_trip + 9 * condition


def test_a_scanned_stacks_memory_traffic_grows_with_its_layers_not_their_square():
    """A scan over L layers of stacked [L, 64, 64] weights reads one layer's slice per step: the program's traffic
    doubles from 4 to 8 layers (a count that charged each step with the whole stack would quadruple)."""

    def traffic(layers: int) -> float:
        def f(x, w):
            return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]

        x = jax.ShapeDtypeStruct((64, 64), jnp.float32)
        w = jax.ShapeDtypeStruct((layers, 64, 64), jnp.float32)
        return hlo.summarize(_compiled_text(f, x, w)).memory_bytes

    assert traffic(8) / traffic(4) == pytest.approx(2.0, rel=0.15)
