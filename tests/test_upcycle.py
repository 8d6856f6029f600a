"""Upcycling dense checkpoints into MoE: the dense function at step 0 (also into and out of uneven
pipeline splits), sharded loading, training and resuming the result, fine-grained training from a
zero router, the online form, and shape mismatches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skymoe_jax import load_model
from skymoe_jax.checkpoint.manager import Checkpointer
from skymoe_jax.checkpoint.upcycle import load_dense, virtual_group_router
from skymoe_jax.cli import main
from skymoe_jax.config import apply_overrides, base_config, load_config
from skymoe_jax.errors import CheckpointError
from skymoe_jax.metrics.writers import read_jsonl
from skymoe_jax.model.moe import router
from skymoe_jax.parallel.mesh import make_mesh
from skymoe_jax.training import runtime as runtime_lib

BASE = [
    "--config.model.d_model=32",
    "--config.model.num_layers=3",
    "--config.model.num_heads=2",
    "--config.model.num_kv_heads=1",
    "--config.model.ffn_dim=64",
    "--config.data.seq_len=32",
    "--config.data.batch_size=8",
    "--config.moe.group_size=0",
    "--config.train.eval_every=0",
    "--config.train.progress=False",
    "--config.optim.warmup_steps=1",
]
DENSE = BASE + ["--config.moe.num_experts=0"]
# Ample eval capacity: nothing drops, so upcycled experts see every token the dense FFN saw.
EXPERTS = BASE + [
    "--config.moe.num_experts=8",
    "--config.moe.top_k=2",
    "--config.moe.expert_ffn_dim=64",
    "--config.moe.eval_capacity_factor=8.0",
]
MOE = EXPERTS + ["--config.parallel.mesh=(1,4,2)"]
GROUPS = ["--config.moe.num_experts=16", "--config.moe.top_k=8"]
SHARED = ["--config.moe.num_shared_experts=2", "--config.moe.shared_expert_ffn_dim=16", "--config.moe.expert_ffn_dim=8"]


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """A dense run trained 3 steps (so its weights are not just the init)."""
    workdir = tmp_path_factory.mktemp("dense") / "run"
    assert main(["train", f"--workdir={workdir}", *DENSE, "--config.train.steps=3"]) == 0
    return workdir


@pytest.fixture(scope="module")
def pipelined_dense_dir(tmp_path_factory):
    """A dense run trained 2 steps on 2 uneven pipeline stages: layers stored as (1, 2), padded to (2, 2)."""
    workdir = tmp_path_factory.mktemp("dense_pipelined") / "run"
    assert (
        main(
            [
                "train",
                f"--workdir={workdir}",
                *DENSE,
                "--config.parallel.mesh=(2,4,1)",
                "--config.parallel.pipeline_stage_layers=(1,2)",
                "--config.train.steps=2",
            ]
        )
        == 0
    )
    return workdir


def _tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 32)), jnp.int32)


@pytest.mark.parametrize(
    "flags",
    [
        [],
        ["--config.moe.gate_norm=False"],
        ["--config.init.upcycle_mode=fine_grained", "--config.moe.expert_ffn_dim=16", "--config.moe.top_k=4"],
        [
            "--config.init.upcycle_mode=fine_grained",
            "--config.moe.expert_ffn_dim=32",
            "--config.moe.top_k=2",
            "--config.moe.renormalize=False",
            "--config.moe.gate_norm=False",
        ],
        [
            "--config.init.upcycle_mode=fine_grained",
            "--config.moe.expert_ffn_dim=32",
            "--config.moe.top_k=2",
            "--config.moe.renormalize=False",
            "--config.moe.score=sigmoid",
            "--config.moe.routed_scale=2.5",
            "--config.moe.num_groups=2",
        ],
        # More experts than slices: 4 virtual groups of 4 slices, top-8 picks two whole groups.
        ["--config.init.upcycle_mode=fine_grained", *GROUPS, "--config.moe.expert_ffn_dim=16"],
        # Shared experts take 32 of the 64 dense units (the sigmoid gate starting at 0.5), 4 slices of 8 the rest.
        ["--config.init.upcycle_mode=fine_grained", *GROUPS, *SHARED, "--config.moe.shared_expert_gate=sigmoid"],
        [*SHARED, "--config.moe.expert_ffn_dim=32"],
    ],
    ids=[
        "copy",
        "copy-no-gate-norm",
        "fine-4-slices",
        "fine-2-slices-no-renorm",
        "fine-2-slices-sigmoid-groups",
        "fine-2-of-4-groups",
        "shared-gated-fine",
        "shared-copy",
    ],
)
def test_upcycled_model_computes_the_dense_function(dense_dir, tmp_path, flags):
    out = tmp_path / "moe"
    assert main(["upcycle", f"--dense={dense_dir}", f"--out={out}", *MOE, *flags]) == 0
    dense, _ = load_model(str(dense_dir))
    moe, config = load_model(str(out))
    assert config.moe.num_experts == apply_overrides(base_config(), [*MOE, *flags]).moe.num_experts
    want, got = dense(_tokens()), moe(_tokens())
    assert float(jnp.max(got.moe["drop_rate"])) == 0.0
    # Same function, summed in another order (k weighted copies, or slices): fp32 rounding only.
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "source,flags",
    [
        ("dense_dir", []),
        # A pipelined dense source, fine-grained: the long profile's (the slots are read by the same code).
        pytest.param(
            "pipelined_dense_dir",
            ["--config.init.upcycle_mode=fine_grained", "--config.moe.expert_ffn_dim=32"],
            marks=pytest.mark.long,
        ),
    ],
    ids=["plain-to-pipelined-copy", "pipelined-to-pipelined-fine"],
)
def test_upcycling_into_an_uneven_pipeline_computes_the_dense_function(request, tmp_path, source, flags):
    # MoE stages (2, 1) are stored as slots (0, 1 | 2, pad); the pipelined dense run's (1, 2) as (0, pad | 2, 3).
    dense_dir = request.getfixturevalue(source)
    out = tmp_path / "moe"
    assert (
        main(
            [
                "upcycle",
                f"--dense={dense_dir}",
                f"--out={out}",
                *EXPERTS,
                *flags,
                "--config.parallel.mesh=(2,2,2)",
                "--config.parallel.pipeline_stage_layers=(2,1)",
            ]
        )
        == 0
    )
    dense, _ = load_model(str(dense_dir))
    moe, config = load_model(str(out))
    assert tuple(config.parallel.pipeline_stage_layers) == (2, 1)
    got = moe(_tokens())
    assert float(jnp.max(got.moe["drop_rate"])) == 0.0
    np.testing.assert_allclose(got.logits, dense(_tokens()).logits, atol=1e-4, rtol=0)


def test_experts_are_split_over_the_expert_axis(dense_dir):
    config = apply_overrides(
        base_config(), [*MOE, "--config.init.upcycle_mode=fine_grained", "--config.moe.expert_ffn_dim=32"]
    )
    mesh = make_mesh(config)
    dense, g, _ = load_dense(str(dense_dir), config, mesh)
    assert g == 2
    w_up = dense["stacks"][0]["blocks"]["layers"][0]["ffn"]["w_up"][...]
    # Fine-grained: each device reads only the FFN slices its experts come from (width 64 over expert=2).
    assert {s.data.shape for s in w_up.addressable_shards} == {(3, 32, 32)}
    from skymoe_jax.checkpoint.upcycle import upcycled_state

    rt = runtime_lib.build(config)
    with jax.set_mesh(rt.mesh):
        state = upcycled_state(apply_overrides(config, [f"--config.init.upcycle_from={dense_dir}"]), rt)
    experts = state.params["stacks"][0]["blocks"]["layers"][0]["ffn"]["experts"]["w_up"][...]
    assert {s.data.shape for s in experts.addressable_shards} == {(3, 4, 32, 32)}  # 8 experts over expert=2


def test_upcycled_checkpoint_trains_resumes_and_is_no_dense_model(dense_dir, tmp_path, capsys):
    out = tmp_path / "moe"
    assert main(["upcycle", f"--dense={dense_dir}", f"--out={out}", *MOE]) == 0
    assert (
        main(
            [
                "train",
                f"--workdir={out}",
                "--config.train.steps=4",
                "--config.train.log_every=2",
                "--config.train.checkpoint_every=2",
            ]
        )
        == 0
    )
    assert main(["train", f"--workdir={out}", "--config.train.steps=6", "--config.train.log_every=2"]) == 0
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [2, 4, 6]
    assert Checkpointer(out).latest_step() == 6
    capsys.readouterr()
    # The trained MoE is no dense model to upcycle.
    assert main(["upcycle", f"--dense={out}", f"--out={tmp_path / 'again'}", *MOE]) == 2
    assert "holds an MoE checkpoint" in capsys.readouterr().err


def test_online_fine_grained_upcycling_trains_and_matches_offline(dense_dir, tmp_path):
    """Fine-grained upcycling without renormalization starts the router at zero: every token's gate logits are
    equal (std 0), where the default gate normalization's gradient used to be NaN and the run stopped at step 1."""
    offline, online = tmp_path / "offline", tmp_path / "online"
    fine = [
        *MOE,
        "--config.init.upcycle_mode=fine_grained",
        "--config.moe.expert_ffn_dim=32",
        "--config.moe.renormalize=False",
    ]
    assert main(["upcycle", f"--dense={dense_dir}", f"--out={offline}", *fine]) == 0
    # train.nonfinite=stop (the default) fails the run at the first non-finite loss or gradient.
    assert main(["train", f"--workdir={offline}", "--config.train.steps=50", "--config.train.log_every=10"]) == 0
    assert (
        main(
            [
                "train",
                f"--workdir={online}",
                *fine,
                f"--config.init.upcycle_from={dense_dir}",
                "--config.train.steps=50",
                "--config.train.log_every=10",
            ]
        )
        == 0
    )
    a, b = read_jsonl(offline / "metrics.jsonl"), read_jsonl(online / "metrics.jsonl")
    assert [r["step"] for r in a] == [10, 20, 30, 40, 50]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in a)
    assert min(a[-1]["max1_max2"]) > 1.0  # the router left its uniform start: it gets gradients
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_shape_mismatch_names_the_parameter(dense_dir, tmp_path, capsys):
    code = main(
        [
            "upcycle",
            f"--dense={dense_dir}",
            f"--out={tmp_path / 'moe'}",
            *MOE,
            "--config.model.num_heads=4",
            "--config.model.num_kv_heads=2",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "dense parameter stacks/0/blocks/layers/0/attn/wk has shape (3, 32, 1, 16)" in err
    assert "needs (3, 32, 2, 8)" in err
    assert not (tmp_path / "moe" / "checkpoints").exists() or not list((tmp_path / "moe" / "checkpoints").iterdir())


def test_upcycling_keeps_the_depth(dense_dir, tmp_path, capsys):
    code = main(["upcycle", f"--dense={dense_dir}", f"--out={tmp_path / 'moe'}", *MOE, "--config.model.num_layers=4"])
    assert code == 2 and "has model.num_layers=3 but the MoE config has 4" in capsys.readouterr().err


@pytest.mark.parametrize("ties,top_k", [("none", 8), ("two-groups", 4), ("all", 8)])
def test_top_k_over_a_virtual_group_router_picks_whole_groups(ties, top_k):
    """Each token's chosen experts are whole groups of 4 consecutive experts, each expert slice e mod 4 once per
    group; also where groups tie (groups 0 and 1 equal, or a zero router), by top-k's lowest-index-first order."""
    g, n, d, tokens = 4, 16, 32, 64
    gate = virtual_group_router(jax.random.key(0), (1, d, n), g, 0.02)[0]
    if ties == "two-groups":
        gate = gate.at[:, g : 2 * g].set(gate[:, :g])
    elif ties == "all":
        gate = jnp.zeros_like(gate)
    assert np.unique(np.asarray(gate), axis=1).shape[1] == {"none": n // g, "two-groups": n // g - 1, "all": 1}[ties]
    x = jax.random.normal(jax.random.key(1), (tokens, d))
    routing = router.route(x @ gate, top_k, gate_norm=True)
    chosen = np.sort(np.asarray(routing.experts), axis=-1).reshape(tokens, top_k // g, g)
    np.testing.assert_array_equal(chosen % g, np.broadcast_to(np.arange(g), chosen.shape))
    np.testing.assert_array_equal(chosen // g, np.broadcast_to(chosen[..., :1] // g, chosen.shape))
    if ties == "two-groups":
        assert np.any(chosen[:, 0, 0] == 0)  # tokens whose best groups tied: group 0 won whole


def test_fine_grained_config_upcycles_the_default_dense_model(tmp_path):
    """configs/fine_grained.py as it is, from configs/default.py's dense model (model.ffn_dim=512), saved at its
    random init (compiling a train step of it would take most of this test's time): the 2 shared experts take
    256 units, 64 experts of 32 the rest as 8 virtual groups of 8 slices, top-8 one whole group. Dropless: at
    step 0 a virtual group's 8 experts get every token that picked it, which the capacity of an evenly balanced
    router need not hold."""
    dense, out = str(tmp_path / "dense"), str(tmp_path / "moe")
    config = load_config("configs/default.py", ["--config.moe.num_experts=0"])
    rt = runtime_lib.build(config)
    with jax.set_mesh(rt.mesh):
        target = Checkpointer(dense, create=True)
        target.save(0, rt.init(), config)
        target.close()
    flags = ["--config=configs/fine_grained.py", FINE, "--config.moe.dropless=True"]
    assert main(["upcycle", f"--dense={dense}", f"--out={out}", *flags]) == 0
    moe, config = load_model(out)
    assert (config.moe.num_experts, config.moe.top_k, config.moe.expert_ffn_dim) == (64, 8, 32)
    assert (config.moe.num_shared_experts, config.moe.shared_expert_ffn_dim) == (2, 128)
    np.testing.assert_allclose(moe(_tokens()).logits, load_model(dense)[0](_tokens()).logits, atol=1e-4, rtol=0)


FINE = "--config.init.upcycle_mode=fine_grained"


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            [FINE, "--config.moe.expert_ffn_dim=16"],
            "moe.top_k and moe.num_experts must be multiples of 4 (got top_k=2, num_experts=8)",
        ),
        ([FINE, "--config.moe.expert_ffn_dim=24"], "needs moe.expert_ffn_dim=24 to divide the dense FFN width 64"),
        (
            [FINE, *SHARED, "--config.moe.shared_expert_ffn_dim=32"],
            "the shared experts' 64 hidden units (moe.num_shared_experts x moe.shared_expert_ffn_dim) must be fewer "
            "than the dense FFN's 64",
        ),
        (
            [FINE, *SHARED, "--config.moe.expert_ffn_dim=12"],
            "moe.expert_ffn_dim=12 to divide the dense FFN width 64 less the shared experts' 32, 32",
        ),
        (SHARED, "copy upcycling needs moe.expert_ffn_dim equal to the dense FFN width 64 less the shared experts' 32"),
    ],
    ids=["top-k-splits-a-group", "width-does-not-divide", "shared-take-all", "shared-rest-does-not-divide", "copy"],
)
def test_upcycling_refuses_what_cannot_compute_the_dense_function(dense_dir, tmp_path, capsys, flags, message):
    code = main(["upcycle", f"--dense={dense_dir}", f"--out={tmp_path / 'moe'}", *MOE, *flags])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err


def test_load_model_rejects_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        load_model(str(tmp_path / "nothing"))


def test_from_checkpoint_starts_from_a_chosen_step(dense_dir):
    """init.from_checkpoint=WORKDIR/checkpoints/STEP: that step's parameters, a fresh optimizer and step."""
    from flax import nnx

    from skymoe_jax.checkpoint.initial import initial_state

    config = apply_overrides(base_config(), [*DENSE, f"--config.init.from_checkpoint={dense_dir}/checkpoints/3"])
    rt = runtime_lib.build(config)
    with jax.set_mesh(rt.mesh):
        state, origin = initial_state(config, rt)
    assert "parameters from" in origin and int(state.step) == 0
    saved, _ = load_model(str(dense_dir / "checkpoints" / "3"))
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(nnx.state(saved, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert all(float(jnp.max(jnp.abs(m))) == 0 for m in jax.tree.leaves(state.opt_state[1][0].mu))
