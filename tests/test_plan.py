"""The planner's per-device bytes against what the sharded train state really occupies on device 0 of 8
simulated devices, for pipelines of 1, 2 and 4 stages (even and uneven), both layouts, ZeRO-1 and FSDP."""

import jax
import pytest

from skymoe_jax.config import base_config
from skymoe_jax.parallel.plan import plan
from skymoe_jax.training import runtime as runtime_lib


def _config(mesh, layout, split=(), **parallel):
    c = base_config()
    c.model.update(d_model=32, num_layers=6, num_heads=4, num_kv_heads=2, ffn_dim=64, vocab_size=96)
    c.moe.update(num_experts=8, top_k=2, expert_ffn_dim=16, group_size=0)
    c.data.update(seq_len=16, batch_size=16)
    c.parallel.update(mesh=mesh, layout=layout, pipeline_stage_layers=split, **parallel)
    return c


def _on_device0(tree) -> int:
    device = jax.devices()[0]
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree) for shard in leaf.addressable_shards
               if shard.device == device)


CASES = [((1, 4, 2), "gshard", (), {}), ((1, 2, 4), "edp", (), {"zero1": True}), ((1, 8, 1), "gshard", (), {"fsdp": True}),
         ((2, 2, 2), "edp", (4, 2), {"zero1": True}), ((2, 4, 1), "gshard", (), {"fsdp": True}),
         ((4, 1, 2), "edp", (2, 2, 1, 1), {}), ((4, 2, 1), "gshard", (), {"zero1": True, "param_dtype": "bfloat16"})]


@pytest.mark.parametrize("mesh,layout,split,opts", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_planned_bytes_are_what_the_state_occupies(mesh, layout, split, opts):
    opts = dict(opts)
    dtype = opts.pop("param_dtype", "float32")
    c = _config(mesh, layout, split, **opts)
    c.model.param_dtype = dtype
    p = plan(c, mesh)
    rt = runtime_lib.build(c)
    with jax.set_mesh(rt.mesh):
        state = rt.init()
    assert p.params_bytes == _on_device0(state.params)
    # The optimizer state also holds Adam's step count (a few scalars); mu and nu are the rest.
    assert 0 <= _on_device0(state.opt_state) - p.optimizer_bytes <= 64


@pytest.mark.parametrize("layout", ["gshard", "edp"])
def test_146b_on_the_papers_mesh_equals_a_hand_count(layout):
    from skymoe_jax.config import load_config

    c = load_config("configs/skywork_moe_146b.py", ["--config.parallel.zero1=True", f"--config.parallel.layout={layout}"])
    d, ff, experts, vocab = 4608, 12288, 16, 65536
    # Stages of (5, 5, 5, 5, 4, ...) layers for 52 over 12: each device stores 5 (stages are padded to the longest).
    # Experts split over expert=4; EDP also splits the attention heads and the vocabulary over it.
    tp = 4 if layout == "edp" else 1
    layer = 4 * d * d / tp + 2 * d + d * experts + experts * 3 * d * ff / 4
    by_hand = 4 * (5 * layer + 2 * vocab * d / tp + d)  # fp32: 5 layers, embedding and head, final norm
    p = plan(c, (12, 32, 4))
    assert p.params_bytes == by_hand
    assert p.optimizer_bytes == pytest.approx(2 * by_hand / 32, rel=1e-3)  # ZeRO-1 splits Adam's state over data
