"""What a pipelined step holds, from the compiler's buffer assignment (XLA:CPU here, XLA:GPU for an A800 without
one): its temporaries do not grow with the number of ticks, and stay within three times the bytes of the stage's
layer weights. The pipeline once stacked a float32 copy of those weights per tick (8x them at 2 microbatches,
22x at 16, on XLA:CPU)."""

import jax
import pytest

from skymoe_jax.config import base_config
from skymoe_jax.parallel import targets
from skymoe_jax.training import state as state_lib
from skymoe_jax.training.compiled import compile_train_step

# The tiny config of the issue that found the copies: 4 MoE layers of width 256, 4 experts, 2 stages, full remat,
# a batch of 16 sequences of 16 tokens.
STAGES = 2


def _config(microbatches: int, repeats: int = 1):
    c = base_config()
    c.model.update(d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, remat="full")
    c.moe.update(num_experts=4, top_k=2, expert_ffn_dim=256, group_size=0)
    c.data.update(seq_len=16, batch_size=16, num_streams=1)
    c.parallel.update(mesh=(STAGES, 1, 1), num_microbatches=microbatches, pipeline_repeats=repeats)
    return c


def _stage_weight_bytes(c) -> float:
    params = jax.eval_shape(state_lib.create(c)[1]).params
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params["stacks"])) / STAGES


def _tick_input_bytes(c) -> int:
    rows = c.data.batch_size // c.parallel.num_microbatches
    return rows * c.data.seq_len * c.model.d_model * 4


# XLA:GPU's memory is what the pipeline-memory target is about; XLA:CPU's schedule is the long profile's.
TARGETS = [
    pytest.param("cpu", marks=pytest.mark.long),
    pytest.param(
        "A800-80GB",
        marks=pytest.mark.skipif(
            not targets.plugin_available(), reason="XLA:GPU compiles need JAX's CUDA plugin: pip install -e '.[aot]'"
        ),
    ),
]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("repeats", [1, pytest.param(2, marks=pytest.mark.long)], ids=["gpipe", "circular"])
def test_temporaries_stay_flat_in_the_ticks_and_within_three_stage_weights(target, repeats):
    """The circular schedule (two chunks a device) is the long profile's: the same loop with twice the ticks."""
    few, many = _config(2, repeats), _config(16, repeats)
    temp = {
        m: compile_train_step(c, targets.devices(target, STAGES)).memory.temporaries for m, c in ((2, few), (16, many))
    }
    ticks = {m: m * repeats + STAGES - 1 for m in temp}
    # 16 microbatches keep 14 more tick inputs (of a smaller microbatch) than 2 do; nothing else may grow.
    extra = (ticks[16] - ticks[2]) * _tick_input_bytes(many)
    assert temp[16] <= 1.15 * temp[2] + extra, temp
    weights = _stage_weight_bytes(few)
    assert max(temp.values()) <= 3 * weights, {m: round(t / weights, 2) for m, t in temp.items()}
