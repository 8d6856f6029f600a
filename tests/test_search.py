"""`skymoe plan`'s mesh search: the balanced pipeline split, the step-time model against hand counts, and
the search's invariants (every layout it reports fits, fastest first, the config's own layout among them)."""

import json

import pytest

from skymoe_jax.cli import main
from skymoe_jax.config import base_config
from skymoe_jax.metrics.flops import flops_per_token, stage_flops_per_token
from skymoe_jax.model.spec import ModelSpec
from skymoe_jax.parallel.devices import Device
from skymoe_jax.parallel.plan import plan
from skymoe_jax.parallel.search import balanced_split, search, step_time

# Round numbers so the hand counts below are easy to follow.
TOY = Device("toy", memory=2**30, peak_flops=1e12, intra_node=100e9, inter_node=10e9, per_node=4)


def _config(**parallel):
    c = base_config()
    c.model.update(d_model=64, num_layers=8, num_heads=4, num_kv_heads=2, ffn_dim=128, vocab_size=512)
    c.moe.update(num_experts=8, top_k=2, expert_ffn_dim=64, group_size=0)
    c.data.update(seq_len=64, batch_size=32)
    c.parallel.update(**parallel)
    return c


def test_balanced_split_gives_the_last_stage_fewer_layers_when_the_head_is_heavy():
    paper = base_config()  # the paper's example: 24 layers as 5,5,5,5,4 over five stages
    paper.model.num_layers = 24
    assert balanced_split(ModelSpec.from_config(paper), 1024, 5) == (5, 5, 5, 5, 4)
    heavy = _config()
    heavy.model.vocab_size = 4096  # head ~ 2 layers of work
    spec = ModelSpec.from_config(heavy)
    split = balanced_split(spec, 64, 4)
    assert sum(split) == 8 and split[-1] < split[0]
    assert max(stage_flops_per_token(spec, 64, split)) < max(stage_flops_per_token(spec, 64, (2, 2, 2, 2)))


def test_step_time_without_a_pipeline_is_compute_plus_the_gradient_all_reduce():
    c = _config(mesh=(1, 8, 1))
    p = plan(c, (1, 8, 1))
    t = step_time(c, p, TOY, mfu=0.5)
    tokens = 32 * 64 // 8
    assert t.compute == pytest.approx(tokens * flops_per_token(ModelSpec.from_config(c), 64) / (0.5 * 1e12))
    # Eight replicas span two nodes of four: the ring all-reduce moves 2 x 7/8 of the gradients at 10 GB/s.
    assert t.gradients == pytest.approx(2 * 7 / 8 * p.params_bytes / 10e9)
    assert t.all_to_all == 0 and t.tensor_parallel == 0


def test_step_time_counts_the_bubble_the_exchange_and_edp_tensor_parallelism():
    c = _config(mesh=(2, 2, 2), layout="edp", zero1=True, num_microbatches=2)
    c.model.remat = "full"
    p = plan(c, (2, 2, 2))
    t = step_time(c, p, TOY, mfu=0.5)
    tokens = 32 * 64 // 4
    # 3 ticks for 2 microbatches; a pipeline under full remat runs the forward three times (the step, the tick's
    # recomputation, the layer's): 5/3 of a step's FLOPs.
    assert t.compute == pytest.approx(3 / 2 * max(p.stage_flops_per_token) * tokens * 5 / 3 / 0.5e12)
    assert t.all_to_all == pytest.approx(p.all_to_all_bytes / 100e9)  # expert pairs sit in one node
    # Two all-reduces per layer and forward pass (six under full remat in a pipeline), of the replica's
    # activations (4 stage layers).
    assert t.tensor_parallel == pytest.approx(6 * 4 * 2 * 1 / 2 * (tokens * 2 * 64 * 4) / 100e9)
    # EDP: gradients are replicated over data (2 replicas, strided by expert=2, one node).
    assert t.gradients == pytest.approx(2 * 1 / 2 * p.params_bytes / 100e9)
    # Each of the 3 ticks sends a microbatch's activations (8 rows of 64 tokens) forward and their gradient back;
    # neighbouring stages are 4 devices apart, in two nodes of four.
    assert t.pipeline == pytest.approx(2 * 3 * (8 * 64 * 64 * 4) / 10e9)


def test_step_time_of_a_circular_schedule_has_a_smaller_bubble_and_more_sends():
    c = _config(mesh=(2, 2, 2), layout="edp", zero1=True, num_microbatches=2)
    circular = c.copy_and_resolve_references()
    circular.parallel.pipeline_repeats = 2
    gpipe, ring = (step_time(x, plan(x, (2, 2, 2)), TOY, mfu=0.5) for x in (c, circular))
    p = plan(circular, (2, 2, 2))
    assert p.repeats == 2 and p.stage_layers == (2, 2, 2, 2)
    tokens = 32 * 64 // 4
    # 2 x 2 + 2 - 1 = 5 ticks of the slowest virtual stage (the last: 2 layers and the head) for 2 microbatches.
    assert ring.compute == pytest.approx(5 / 2 * max(p.stage_flops_per_token) * tokens * 4 / 3 / 0.5e12)
    assert ring.compute < gpipe.compute
    assert ring.pipeline == pytest.approx(5 / 3 * gpipe.pipeline)


def test_search_reports_only_what_fits_fastest_first_and_finds_the_configs_own_layout():
    c = _config(mesh=(2, 2, 2), layout="edp", zero1=True, num_microbatches=2)
    result = search(c, 8, TOY)
    assert result.candidates and result.refused > 0  # e.g. expert=8 meshes with 32 rows over 8 x 8
    steps = [x.step.total for x in result.candidates]
    assert steps == sorted(steps)
    assert all(x.fits == (x.plan.peak_bytes <= 0.9 * TOY.memory) for x in result.candidates)
    meshes = {x.plan.mesh for x in result.candidates}
    assert {(1, 8, 1), (1, 4, 2), (2, 2, 2), (8, 1, 1)} <= meshes
    own = [x for x in result.candidates if x.key == ((2, 2, 2), "edp", "zero1", "none", 2, (4, 4), 1)]
    assert any(x.plan.repeats == 2 and x.plan.mesh == (2, 2, 2) for x in result.candidates)
    assert len(own) == 1 and own[0].plan.peak_bytes == plan(c, (2, 2, 2), platform="gpu").peak_bytes
    tiny = Device("tiny", memory=2**20, peak_flops=1e12, intra_node=100e9, inter_node=10e9)
    assert not search(c, 8, tiny).fitting


def test_plan_command(capsys):
    assert (
        main(
            [
                "plan",
                "--devices=8",
                "--device=H100-80GB",
                "--config.parallel.mesh=(2,4,1)",
                "--config.parallel.num_microbatches=2",
                "--top=3",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["fitting"] > 3 and len(out["shown"]) == 3 and all(r["fits"] for r in out["shown"])
    assert [r["rank"] for r in out["shown"]] == sorted(r["rank"] for r in out["shown"])
    assert out["config_layout"]["layout"].startswith("2x4x1 gshard none remat=none stages 2x2, 2 microbatches")
    assert main(["plan", "--devices=8", "--device=H100-80GB"]) == 0
    assert "the 10 fastest that fit" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--devices=8", "--device=V100"], "--device='V100' is not in the device table"),
        (["--devices=8", "--device=H200", "--mfu=2"], "--mfu='2' must be a number in (0, 1]"),
        (["--device=H200"], "skymoe plan needs --devices=N"),
    ],
)
def test_plan_refuses_bad_flags_in_one_line(args, needle, capsys):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
