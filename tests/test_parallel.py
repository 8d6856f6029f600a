"""SPMD over (pipeline, data, expert) meshes on 8 simulated devices: one train step on
every mesh and layout equals the single-device step; the compiled step really
exchanges tokens with all-to-all and really splits what it should."""

import re

import jax
import numpy as np
import pytest

from skymoe_jax.config import base_config
from skymoe_jax.errors import ConfigError
from skymoe_jax.model.moe.expert_parallel import Comm
from skymoe_jax.parallel.mesh import make_mesh
from skymoe_jax.training import runtime as runtime_lib
from skymoe_jax.training.step import LossSettings, loss_fn


def _config(mesh=(1, 1, 1), layout="gshard", zero1=False, fsdp=False, qk_norm="none", **moe):
    c = base_config()
    c.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64, vocab_size=64, qk_norm=qk_norm)
    c.moe.update(num_experts=8, top_k=2, expert_ffn_dim=16, group_size=16, capacity_factor=1.0, **moe)
    c.data.update(seq_len=16, batch_size=16)
    c.optim.warmup_steps = 0  # a non-zero first update, so the new parameters are compared too
    c.aux_coef.initial_alpha = 0.005
    c.parallel.update(mesh=mesh, layout=layout, zero1=zero1, fsdp=fsdp)
    return c


def _batch(c):
    rng = np.random.default_rng(0)
    b, s = c.data.batch_size, c.data.seq_len
    tokens = rng.integers(0, c.model.vocab_size, (b, s + 1)).astype(np.int32)
    segments = np.where(np.arange(s) < s // 2, 1, 2)[None].repeat(b, 0).astype(np.int32)  # two documents a row
    positions = np.where(segments == 1, np.arange(s), np.arange(s) - s // 2).astype(np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": positions,
        "segment_ids": segments,
        "loss_mask": np.ones((b, s), np.float32),
    }


def _called(text: str, attrs: str) -> list[str]:
    """Names of the computations that instructions in `text` call through the attributes `attrs`."""
    return re.findall(r"%([\w.-]+)", " ".join(re.findall(rf"(?:{attrs})=(\{{[^}}]*\}}|%[\w.-]+)", text)))


def _permutes_in_branches(hlo: str) -> list[str]:
    """Collective permutes in computations that a conditional runs (directly or through calls), in compiled HLO.

    The pipeline branches on the stage; a permute there is emitted for every device, but the devices of the
    other stages never reach it, so the step would hang (on CPU: abort after a 40 s rendezvous timeout)."""
    branches = "branch_computations|true_computation|false_computation"
    bodies = dict(re.findall(r"^(?:ENTRY )?%?([\w.-]+) [^\n]*\{\n(.*?)\n\}$", hlo, re.M | re.S))
    todo, seen = _called(hlo, branches), set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += _called(bodies.get(name, ""), f"to_apply|calls|body|condition|{branches}")
    return [
        line.strip() for name in seen for line in bodies.get(name, "").splitlines() if " collective-permute" in line
    ]


def _step_and_hlo(c, devices):
    """((grads, new state, metrics), StableHLO text) of one train step on a mesh over `devices`."""
    rt = runtime_lib.build(c, devices)
    with jax.set_mesh(rt.mesh):
        state, batch = rt.init(), rt.batch(_batch(c))
        settings = LossSettings.from_config(c)
        grad_fn = jax.grad(lambda p, b, a: loss_fn(p, rt.graphdef, b, a, settings, train=True)[0])
        # One compile for both: the gradients, and the runtime's own (sharded) train step.
        lowered = jax.jit(lambda st, b: (grad_fn(st.params, b, st.alpha), rt.train_step(st, b))).lower(state, batch)
        compiled = lowered.compile()
        assert not _permutes_in_branches(compiled.as_text())  # checked before running: it would hang
        grads, (new_state, metrics) = compiled(state, batch)
        return jax.device_get((grads, new_state, metrics)), lowered.as_text()


def _step(c, devices):
    """(grads, new state, metrics) of one train step on a mesh over `devices`."""
    return _step_and_hlo(c, devices)[0]


@pytest.fixture(scope="module")
def reference():
    """The one-device step of each model the cases use, made when a case first asks for it."""
    steps = {}

    def step(model: dict):
        key = tuple(sorted(model.items()))
        if key not in steps:
            steps[key] = _step(_config(**model), jax.devices()[:1])
        return steps[key]

    return step


# What a case changes in the model rather than in its placement.
MODEL_FIELDS = (
    "dropless",
    "num_shared_experts",
    "shared_expert_gate",
    "qk_norm",
    "score",
    "num_groups",
    "top_groups",
    "aux_scope",
)


# The default run: pure data parallelism, both layouts with the expert axis above 1, ZeRO-1 and FSDP riding on
# them rather than adding cases (each compiles a sharded step), and dropless. The long profile (SKYMOE_LONG=1)
# adds the rest: every mesh in both layouts, FSDP on gshard, ZeRO-1 on EDP, dropless EDP.
CASES = [
    ((1, 8, 1), "gshard", {}),
    ((1, 4, 2), "gshard", {"zero1": True}),
    pytest.param((1, 2, 4), "gshard", {"fsdp": True}, marks=pytest.mark.long),
    pytest.param((1, 1, 8), "gshard", {}, marks=pytest.mark.long),
    pytest.param((1, 8, 1), "edp", {}, marks=pytest.mark.long),
    # EDP splits heads and the dense FFNs' width over the expert axis: the full-width QK-norm's mean and the shared
    # experts (split like a dense FFN) then span devices. DeepSeek-V3's routing rides along: sigmoid scores, groups
    # of experts (each group on one device of the expert axis), the per-sequence aux loss from rows whose tokens
    # the expert axis splits, and no dropping (each device's share of the tokens sends its assigned rows).
    (
        (1, 4, 2),
        "edp",
        {
            "fsdp": True,
            "dropless": True,
            "num_shared_experts": 1,
            "shared_expert_gate": "sigmoid",
            "qk_norm": "full",
            "score": "sigmoid",
            "num_groups": 4,
            "top_groups": 2,
            "aux_scope": "sequence",
        },
    ),
    pytest.param((1, 2, 4), "edp", {"zero1": True}, marks=pytest.mark.long),
    pytest.param((1, 1, 8), "edp", {}, marks=pytest.mark.long),
    ((1, 2, 4), "gshard", {"dropless": True}),
    # The same routing on gshard, where the expert axis splits the batch and each device holds two groups' experts.
    pytest.param(
        (1, 2, 4),
        "gshard",
        {
            "num_shared_experts": 1,
            "qk_norm": "head",
            "score": "sigmoid",
            "num_groups": 4,
            "top_groups": 2,
            "aux_scope": "sequence",
        },
        marks=pytest.mark.long,
    ),
    pytest.param((1, 2, 4), "edp", {"dropless": True}, marks=pytest.mark.long),
]


@pytest.mark.parametrize("mesh,layout,opts", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_sharded_step_equals_single_device(reference, mesh, layout, opts):
    model = {k: v for k, v in opts.items() if k in MODEL_FIELDS}
    par = {k: v for k, v in opts.items() if k not in MODEL_FIELDS}
    grads0, state0, metrics0 = reference(model)
    grads, state, metrics = _step(_config(mesh, layout, **par, **model), jax.devices())
    # Routing decisions are discrete and must agree exactly.
    np.testing.assert_array_equal(metrics["drop_rate"], metrics0["drop_rate"])
    np.testing.assert_array_equal(metrics["expert_load"], metrics0["expert_load"])
    # fp32 sums in another order: relative differences of a few ulps per reduction level.
    np.testing.assert_allclose(metrics["loss"], metrics0["loss"], rtol=2e-6)
    np.testing.assert_allclose(metrics["alpha"], metrics0["alpha"], rtol=1e-6)
    np.testing.assert_array_equal(metrics["max_vio"], metrics0["max_vio"])
    np.testing.assert_allclose(metrics["seq_max_vio"], metrics0["seq_max_vio"], rtol=1e-6)
    np.testing.assert_allclose(metrics["layer_aux_loss"], metrics0["layer_aux_loss"], rtol=1e-5)
    for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
        np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-7)
    # After one Adam step each parameter moved by ~lr*sign(g); a sign flip would show as 2*lr. Where the gradient is
    # within rounding of zero, Adam's g / (|g| + eps) is anything from 0 to 1 and so is the move: not compared.
    for p, p0, g0 in zip(jax.tree.leaves(state.params), jax.tree.leaves(state0.params), jax.tree.leaves(grads0)):
        settled = np.abs(np.asarray(g0)) > 1e-6
        np.testing.assert_allclose(np.asarray(p)[settled], np.asarray(p0)[settled], atol=1e-5)


def test_sequence_means_add_up_the_rows_that_edp_shares_cut():
    """Under EDP each device of the expert axis takes a share of its shard's tokens: 3 rows of 4 tokens over 4
    devices give shares of 3 tokens, which cut rows; the devices add up their partial row sums."""
    a = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
    comm = Comm(("expert",), "expert", "expert")
    mesh = jax.make_mesh((4,), ("expert",), devices=jax.devices()[:4])
    rows, mean = jax.shard_map(
        lambda share: (comm.sequence_means(share, 4), comm.row_mean(comm.sequence_means(share, 4))),
        mesh=mesh,
        in_specs=jax.P("expert"),
        out_specs=(jax.P(), jax.P()),
    )(jax.device_put(a, jax.NamedSharding(mesh, jax.P("expert"))))
    np.testing.assert_allclose(rows, a.reshape(3, 4, 5).mean(1), rtol=1e-6)
    np.testing.assert_allclose(mean, a.mean(0), rtol=1e-6)


def _compiled(c):
    rt = runtime_lib.build(c)
    with jax.set_mesh(rt.mesh):
        state, batch = rt.init(), rt.batch(_batch(c))
        return rt, state, rt.train_step.lower(state, batch).compile().as_text()


def _leaf(tree, *path):
    node = tree
    for key in path:
        node = node[key]
    return node


def test_expert_parallel_step_uses_all_to_all_and_splits_experts():
    rt, state, hlo = _compiled(_config((1, 4, 2), zero1=True))
    assert "all-to-all" in hlo
    experts = _leaf(state.params, "stacks", 0, "blocks", "layers", 0, "ffn", "experts")
    w_up = experts["w_up"][...]
    assert w_up.shape == (2, 8, 32, 16)
    assert {s.data.shape for s in w_up.addressable_shards} == {(2, 4, 32, 16)}  # 8 experts over expert=2
    mu = state.opt_state[1][0].mu  # clip, then adamw's ScaleByAdamState
    mu_up = _leaf(mu, "stacks", 0, "blocks", "layers", 0, "ffn", "experts", "w_up")[...]
    assert {s.data.shape for s in mu_up.addressable_shards} == {(2, 4, 8, 16)}  # ZeRO-1: embed over data=4
    wq = _leaf(state.params, "stacks", 0, "blocks", "layers", 0, "attn", "wq")[...]
    assert {s.data.shape for s in wq.addressable_shards} == {wq.shape}  # gshard: attention replicated


def test_edp_layout_is_tensor_parallel_over_the_expert_axis():
    rt, state, hlo = _compiled(_config((1, 2, 4), layout="edp"))
    assert "all-to-all" in hlo
    wq = _leaf(state.params, "stacks", 0, "blocks", "layers", 0, "attn", "wq")[...]
    assert {s.data.shape for s in wq.addressable_shards} == {(2, 32, 1, 8)}  # 4 heads over expert=4
    w_up = _leaf(state.params, "stacks", 0, "blocks", "layers", 0, "ffn", "experts", "w_up")[...]
    assert {s.data.shape for s in w_up.addressable_shards} == {(2, 2, 32, 16)}  # whole experts per device


@pytest.mark.parametrize(
    "mesh,needle",
    [
        ((1, 3, 1), "needs 3 devices but 8 are available"),
        ((1, -1, 3), "do not split"),
        ((2, 4, 1), "= 2 rows must be divisible by the 4 devices"),  # 8 microbatches of 16 rows
        ((1, 1, 8), None),
    ],
)
def test_mesh_errors(mesh, needle):
    c = _config(mesh)
    c.parallel.num_microbatches = 8
    if needle is None:
        c.moe.num_experts = 4
        needle = "moe.num_experts=4 must be divisible by the expert mesh axis (8)"
    with pytest.raises(ConfigError) as err:
        make_mesh(c)
    assert needle in str(err.value)


def test_plan_splits_bytes_by_the_rules():
    from skymoe_jax.metrics.flops import param_counts
    from skymoe_jax.model.spec import ModelSpec
    from skymoe_jax.parallel.plan import plan

    c = _config()
    counts = param_counts(ModelSpec.from_config(c))
    whole = plan(c, (1, 1, 1))
    assert whole.params_bytes == 4 * counts.total and whole.optimizer_bytes == 8 * counts.total
    assert whole.all_to_all_bytes == 0
    ep = plan(c, (1, 4, 2))
    assert ep.params_bytes == 4 * (counts.total - counts.expert / 2)  # experts split over expert=2
    c.parallel.zero1 = True
    zero = plan(c, (1, 4, 2))
    assert zero.params_bytes == ep.params_bytes and zero.optimizer_bytes < ep.optimizer_bytes / 3
    # Slot buffer: 8 experts x (tokens per device / group) groups x capacity x d_model, fp32, 4 exchanges a layer.
    tokens = 16 * 16 // 8
    buffer = 8 * (tokens // 16) * 4 * 32 * 4  # capacity ceil(1.0 * 16 * 2 / 8) = 4
    assert ep.all_to_all_bytes == 2 * 4 * buffer * (2 - 1) / 2
    # Dropless: a device's k x tokens assigned rows where the platform has ragged-all-to-all; on the CPU the per-peer
    # buffers of the worst case, each tokens x min(k, local experts) rows.
    c.moe.dropless = True
    assert plan(c, (1, 4, 2), "gpu").all_to_all_bytes == 2 * 4 * (2 * tokens * 32 * 4) * (2 - 1) / 2
    assert plan(c, (1, 4, 2), "cpu").all_to_all_bytes == 2 * 4 * (2 * tokens * 2 * 32 * 4) * (2 - 1) / 2
