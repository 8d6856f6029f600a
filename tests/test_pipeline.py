"""Pipeline parallelism on 8 simulated devices: pipelined steps equal the unpipelined one, for 2 and 4
stages, even and uneven splits, GPipe and circular schedules, combined with data and expert axes, ZeRO-1 and FSDP;
where the circular schedule keeps its layers; the balance report; bad splits."""

import jax
import numpy as np
import pytest
from test_parallel import _step_and_hlo

from skymoe_jax.config import apply_overrides, base_config, load_config
from skymoe_jax.errors import ConfigError
from skymoe_jax.metrics.flops import pipeline_utilization, stage_flops_per_token
from skymoe_jax.model.mesh_layout import MeshLayout
from skymoe_jax.model.pipeline import bubble_fraction
from skymoe_jax.model.spec import ModelSpec
from skymoe_jax.parallel.plan import plan


def _config(mesh=(1, 1, 1), split=(), microbatches=2, layout="gshard", remat=()):
    c = base_config()
    c.model.update(d_model=32, num_layers=6, num_heads=4, num_kv_heads=2, ffn_dim=64, vocab_size=64)
    # One sequence per routing group, so groups are the same tokens with and without microbatches.
    c.moe.update(num_experts=8, top_k=2, expert_ffn_dim=16, group_size=0, capacity_factor=1.0)
    c.data.update(seq_len=16, batch_size=16)
    c.optim.warmup_steps = 0
    c.aux_coef.initial_alpha = 0.005
    c.parallel.update(
        mesh=mesh, layout=layout, pipeline_stage_layers=split, num_microbatches=microbatches, stage_remat=remat
    )
    return c


def _canonical(tree, config):
    """Pipelined parameters are stored stage by stage with padding; put the layers back in order."""
    slots = MeshLayout.from_config(config).layer_slots(config.model.num_layers)
    stacks = tree["stacks"][0]["blocks"]
    return jax.tree.map(lambda a: a[slots], stacks), {k: tree[k] for k in ("embed", "final_norm", "head")}


@pytest.fixture(scope="module")
def reference():
    """The one-device step of each model the cases use (their `moe` fields), made when a case first asks."""
    steps = {}

    def step(moe: dict):
        key = tuple(sorted(moe.items()))
        if key not in steps:
            c = _config()
            c.moe.update(moe)
            steps[key] = _step_and_hlo(c, jax.devices()[:1])[0]
        return steps[key]

    return step


# DeepSeek-V3's routing on one case: sigmoid scores, groups of experts, the per-sequence aux loss from microbatches,
# no dropping (the assigned rows exchanged over the expert axis inside the pipeline's stages).
DEEPSEEK = {"moe": {"score": "sigmoid", "num_groups": 4, "top_groups": 2, "aux_scope": "sequence", "dropless": True}}


CASES = [
    pytest.param((2, 4, 1), (), "gshard", (), {}, marks=pytest.mark.long),  # 2 even stages x data
    ((4, 1, 2), (2, 2, 1, 1), "edp", ("full", "none", "dots", "full"), {}),  # 4 uneven stages, EDP, remat by stage
    # The paper's pipeline x data x expert, every axis above 1, uneven, with FSDP and two microbatches; the long
    # profile adds it in the EDP layout, even, with ZeRO-1 and one microbatch (the bfloat16 test below runs EDP).
    ((2, 2, 2), (4, 2), "gshard", (), {"fsdp": True}),
    pytest.param((2, 2, 2), (3, 3), "edp", (), {"zero1": True, "num_microbatches": 1}, marks=pytest.mark.long),
    # Pipeline x expert, the rest of the batch on one data row, every layer under full remat (the recomputing
    # backward of model/pipeline.py) on the defaults' split; the (4, 1, 2) case runs that backward on its full stages.
    pytest.param((2, 1, 4), (), "edp", ("full", "full"), {"zero1": True}, marks=pytest.mark.long),
    # Circular schedules: two chunks per device, uneven, with ZeRO-1 and more microbatches than stages on (2, 2, 2);
    # the long profile adds even chunks on (2, 1, 4) and three chunks with FSDP.
    pytest.param((2, 1, 4), (), "gshard", (), {"pipeline_repeats": 2}, marks=pytest.mark.long),
    ((2, 2, 2), (1, 2, 2, 1), "edp", (), {"pipeline_repeats": 2, "zero1": True, "num_microbatches": 4, **DEEPSEEK}),
    pytest.param(
        (2, 1, 4),
        (),
        "edp",
        ("full", "none"),
        {"pipeline_repeats": 3, "fsdp": True, "num_microbatches": 4},
        marks=pytest.mark.long,
    ),
]


def _layers_and_rest(tree):
    return tree["stacks"][0]["blocks"], {k: tree[k] for k in ("embed", "final_norm", "head")}


@pytest.mark.parametrize("mesh,split,layout,remat,parallel", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_pipelined_step_equals_unpipelined(reference, mesh, split, layout, remat, parallel):
    moe = parallel.get("moe", {})
    grads0, state0, metrics0 = reference(moe)
    c = _config(mesh, split, layout=layout, remat=remat)
    c.moe.update(moe)
    c.parallel.update({k: v for k, v in parallel.items() if k != "moe"})
    (grads, state, metrics), hlo = _step_and_hlo(c, jax.devices())
    assert "collective_permute" in hlo  # stage-to-stage sends (StableHLO spelling)
    np.testing.assert_array_equal(metrics["drop_rate"], metrics0["drop_rate"])
    np.testing.assert_array_equal(metrics["expert_load"], metrics0["expert_load"])
    np.testing.assert_allclose(metrics["loss"], metrics0["loss"], rtol=2e-6)
    np.testing.assert_allclose(metrics["alpha"], metrics0["alpha"], rtol=1e-6)
    np.testing.assert_allclose(metrics["seq_max_vio"], metrics0["seq_max_vio"], rtol=1e-6)
    np.testing.assert_allclose(metrics["layer_aux_loss"], metrics0["layer_aux_loss"], rtol=1e-5)
    # The pipelined layout keeps the plain init's layers at their slots, so parameters are equal; the math
    # is the same in other summation orders (tolerances as in test_parallel).
    for g, g0 in zip(jax.tree.leaves(_canonical(grads, c)), jax.tree.leaves(_layers_and_rest(grads0))):
        np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-7)
    for p, p0 in zip(jax.tree.leaves(_canonical(state.params, c)), jax.tree.leaves(_layers_and_rest(state0.params))):
        # Adam's first update is lr * g / (|g| + eps): for |g| near eps it amplifies the tiny absolute
        # gradient differences allowed above, so allow 1% of lr (3e-3); a wrong gradient moves it by ~lr.
        np.testing.assert_allclose(p, p0, atol=3e-5)
    split = MeshLayout.from_config(c)
    n = c.model.num_layers
    padding = np.setdiff1d(np.arange(split.stored_layers(n)), split.layer_slots(n))
    for p in jax.tree.leaves(state.params["stacks"][0]["blocks"]):
        assert not np.any(np.asarray(p)[padding])  # padded slots never train


def test_bfloat16_pipeline_trains_like_the_unpipelined_bfloat16_step():
    """bfloat16 parameters and compute through a (2, 2, 2) pipeline; it once aborted inside XLA's partitioner."""

    def step(mesh, devices):
        c = _config(mesh, (4, 2), layout="edp")
        c.model.update(dtype="bfloat16", param_dtype="bfloat16")
        return _step_and_hlo(c, devices)[0], c

    (grads0, _, metrics0), _ = step((1, 1, 1), jax.devices()[:1])
    (grads, _, metrics), c = step((2, 2, 2), jax.devices())
    assert jax.tree.leaves(grads)[0].dtype == np.dtype("bfloat16")
    np.testing.assert_allclose(metrics["loss"], metrics0["loss"], rtol=1e-3)  # measured: 2e-5
    # Routing decides on bfloat16 activations, so rounding in another summation order flips a few top-k
    # choices and capacity drops: measured against one device, the router's gradient differs by 7% on the
    # unpipelined (1, 2, 4) mesh and 15% on this one, the other leaves by 1-9%. A lost stage or microbatch
    # is off by about 100%.
    for g, g0 in zip(jax.tree.leaves(_canonical(grads, c)), jax.tree.leaves(_layers_and_rest(grads0))):
        g, g0 = np.asarray(g, np.float32), np.asarray(g0, np.float32)
        assert np.linalg.norm(g - g0) <= 0.3 * np.linalg.norm(g0)


def test_a_circular_schedule_deals_the_layers_round_robin():
    """Two devices, two chunks each: virtual stages 0..3 run on devices 0, 1, 0, 1, and each device stores its
    chunks one after the other, padded to the longest chunk."""
    split = MeshLayout(stage_layers=(2, 2, 1, 1), repeats=2)
    assert split.devices == 2 and split.stored_layers(6) == 8
    np.testing.assert_array_equal(split.chunk_layers(), [[2, 1], [2, 1]])
    # Layers 0-1 (device 0, chunk 0), 2-3 (device 1, chunk 0), 4 (device 0, chunk 1), 5 (device 1, chunk 1).
    np.testing.assert_array_equal(split.layer_slots(6), [0, 1, 4, 5, 2, 6])
    c = apply_overrides(
        _config(),
        [
            "--config.parallel.mesh=(2,4,1)",
            "--config.parallel.pipeline_repeats=2",
            "--config.parallel.num_microbatches=2",
        ],
    )
    assert MeshLayout.from_config(c) == MeshLayout(stage_layers=(2, 2, 1, 1), repeats=2)
    assert bubble_fraction(2, 4, 2) == pytest.approx(1 / 9)
    assert bubble_fraction(2, 4, 2) < bubble_fraction(2, 4)
    assert pipeline_utilization([1.0] * 4, 4, 2) == pytest.approx(1 - bubble_fraction(2, 4, 2))


def test_stage_flops_and_bubble_for_24_layers():
    config = load_config("configs/experiments/pipeline_24l.py")
    spec = ModelSpec.from_config(config)
    even = stage_flops_per_token(spec, config.data.seq_len, (6, 6, 6, 6))
    uneven = stage_flops_per_token(spec, config.data.seq_len, (5, 5, 5, 5, 4))
    layer = even[0] / 6
    head = even[-1] - even[0]
    assert uneven == pytest.approx([5 * layer] * 4 + [4 * layer + head])
    assert 0.5 * layer < head < layer  # the head costs most of a layer, so the 4-layer last stage balances
    assert max(uneven) / np.mean(uneven) < max(even) / np.mean(even)
    assert pipeline_utilization(uneven, 16) > pipeline_utilization(even, 16)
    assert pipeline_utilization([1.0] * 4, 16) == pytest.approx(1 - bubble_fraction(4, 16))
    report = plan(
        apply_overrides(
            config, ["--config.parallel.mesh=(5,1,1)", "--config.parallel.pipeline_stage_layers=(5,5,5,5,4)"]
        ),
        (5, 1, 1),
    )
    assert report.stage_flops_per_token == pytest.approx(tuple(uneven))


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (
            ["--config.parallel.mesh=(2,4,1)", "--config.parallel.pipeline_stage_layers=(4,1)"],
            "must give 2 stages (the pipeline axis) of at least one layer summing to model.num_layers=6",
        ),
        (
            ["--config.parallel.mesh=(2,4,1)", "--config.parallel.num_microbatches=3"],
            "parallel.num_microbatches=3 must be a positive divisor of data.batch_size=16",
        ),
        (["--config.parallel.mesh=(2,4,1)", "--config.moe.moe_every=2"], "pipeline parallelism needs identical layers"),
        (
            [
                "--config.parallel.mesh=(2,4,1)",
                "--config.parallel.pipeline_repeats=2",
                "--config.parallel.num_microbatches=1",
            ],
            "parallel.pipeline_repeats=2 needs parallel.num_microbatches >= the pipeline axis (2), not 1",
        ),
        (
            [
                "--config.parallel.mesh=(2,4,1)",
                "--config.parallel.pipeline_repeats=2",
                "--config.parallel.num_microbatches=2",
                "--config.parallel.pipeline_stage_layers=(3,3)",
            ],
            "must give 4 virtual stages (the pipeline axis 2 x parallel.pipeline_repeats=2)",
        ),
        (
            [
                "--config.parallel.mesh=(4,2,1)",
                "--config.parallel.pipeline_repeats=2",
                "--config.parallel.num_microbatches=4",
            ],
            "model.num_layers=6 cannot fill 8 pipeline stages (4 devices x parallel.pipeline_repeats=2)",
        ),
        (["--config.parallel.pipeline_repeats=2"], "need a pipeline axis"),
        (["--config.parallel.mesh=(2,4,1)", "--config.parallel.pipeline_repeats=0"], "must be a positive integer"),
    ],
)
def test_bad_pipeline_settings_are_one_line(overrides, needle):
    with pytest.raises(ConfigError) as err:
        apply_overrides(_config(), overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)
