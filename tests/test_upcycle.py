"""Upcycling dense checkpoints into MoE: the dense function at step 0 (also into and out of uneven
pipeline splits), sharded loading, training and resuming the result, fine-grained training from a
zero router, the online form, and shape mismatches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skymoe_jax import load_model
from skymoe_jax.checkpoint.manager import Checkpointer
from skymoe_jax.checkpoint.upcycle import load_dense
from skymoe_jax.cli import main
from skymoe_jax.config import apply_overrides, base_config
from skymoe_jax.errors import CheckpointError
from skymoe_jax.metrics.writers import read_jsonl
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
    ],
    ids=["copy", "copy-no-gate-norm", "fine-4-slices", "fine-2-slices-no-renorm", "fine-2-slices-sigmoid-groups"],
)
def test_upcycled_model_computes_the_dense_function(dense_dir, tmp_path, flags):
    out = tmp_path / "moe"
    assert main(["upcycle", f"--dense={dense_dir}", f"--out={out}", *MOE, *flags]) == 0
    dense, _ = load_model(str(dense_dir))
    moe, config = load_model(str(out))
    assert config.moe.num_experts == 8
    want, got = dense(_tokens()), moe(_tokens())
    assert float(jnp.max(got.moe["drop_rate"])) == 0.0
    # Same function, summed in another order (k weighted copies, or slices): fp32 rounding only.
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "source,flags",
    [
        ("dense_dir", []),
        ("pipelined_dense_dir", ["--config.init.upcycle_mode=fine_grained", "--config.moe.expert_ffn_dim=32"]),
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
    """Fine-grained upcycling starts the router at zero: every token's gate logits are equal (std 0), where
    the default gate normalization's gradient used to be NaN and the run stopped at step 1."""
    offline, online = tmp_path / "offline", tmp_path / "online"
    fine = [*MOE, "--config.init.upcycle_mode=fine_grained", "--config.moe.expert_ffn_dim=32"]
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


def test_fine_grained_needs_matching_top_k(dense_dir, tmp_path, capsys):
    code = main(
        [
            "upcycle",
            f"--dense={dense_dir}",
            f"--out={tmp_path / 'moe'}",
            *MOE,
            "--config.init.upcycle_mode=fine_grained",
            "--config.moe.expert_ffn_dim=16",
        ]
    )
    assert code == 2 and "moe.top_k=4" in capsys.readouterr().err


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
