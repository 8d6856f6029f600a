"""Property-based test over the config space: every drawn config is either refused with one sentence
before training starts, or trains with finite loss, gradients and alphas, saves a checkpoint that
resumes exactly (bit for bit from a mid-run checkpoint), evaluates with `skymoe eval` and loads
with `load_model`.

Configs come from a seeded generator, so a failure names its seed and the command line that
reproduces it. The default profile runs one seed (half a minute); `SKYMOE_FUZZ=long` runs
SKYMOE_FUZZ_COUNT seeds (default 300), and `SKYMOE_FUZZ_SEEDS=3,17` reruns chosen ones.
"""

import os
import shutil

import jax
import numpy as np
import pytest

from skymoe_jax import load_model
from skymoe_jax.cli import main
from skymoe_jax.config import apply_overrides, base_config
from skymoe_jax.errors import ConfigError
from skymoe_jax.metrics.writers import read_jsonl

STEPS, SAVE_EVERY = 3, 2  # checkpoints at 2 (mid-run) and 3; the resumed run redoes step 3
MESHES = [(1, 8, 1), (1, 4, 2), (1, 2, 4), (1, 1, 8), (2, 4, 1), (2, 2, 2), (2, 1, 4), (4, 2, 1), (4, 1, 2), (8, 1, 1)]


def _seeds() -> list[int]:
    if os.environ.get("SKYMOE_FUZZ_SEEDS"):
        return [int(s) for s in os.environ["SKYMOE_FUZZ_SEEDS"].split(",")]
    if os.environ.get("SKYMOE_FUZZ") == "long":
        return list(range(int(os.environ.get("SKYMOE_FUZZ_COUNT", "300"))))
    return FAST_SEEDS + (LONG_SEEDS if os.environ.get("SKYMOE_LONG") == "1" else [])


def _pick(rng, options, weights=None):
    if weights is not None:
        weights = np.asarray(weights, float) / np.sum(weights)
    return options[rng.choice(len(options), p=weights)]


def _split(rng, layers: int, stages: int) -> tuple[int, ...]:
    """A random composition of layers into stages parts of at least one layer."""
    cuts = sorted(rng.choice(np.arange(1, layers), stages - 1, replace=False).tolist())
    return tuple(b - a for a, b in zip([0, *cuts], [*cuts, layers]))


def draw(seed: int) -> dict[str, object]:
    """One config as {field: value} overrides on the defaults, with a start ('random', 'upcycle', 'checkpoint')."""
    rng = np.random.default_rng(seed)
    c: dict[str, object] = {}
    mesh = _pick(rng, MESHES)
    stages = mesh[0]
    d_model = int(_pick(rng, [16, 32, 64]))
    heads = int(_pick(rng, [h for h in (1, 2, 4) if (d_model // h) % 2 == 0]))
    c["model.d_model"], c["model.num_heads"] = d_model, heads
    c["model.num_kv_heads"] = int(_pick(rng, [k for k in (1, 2, 4) if heads % k == 0]))
    c["model.num_layers"] = layers = int(rng.integers(stages, stages + 3))
    c["model.ffn_dim"] = ffn = int(_pick(rng, [32, 64]))
    c["model.vocab_size"] = int(_pick(rng, [256, 300]))
    c["model.dtype"] = _pick(rng, ["float32", "bfloat16"], [3, 1])
    c["model.param_dtype"] = _pick(rng, ["float32", "bfloat16"], [5, 1])
    c["model.remat"] = _pick(rng, ["none", "dots", "full"])
    c["model.qkv_bias"] = bool(rng.random() < 0.2)
    # From its own stream: a draw added to the shared one would have changed every seed's later draws.
    c["model.qk_norm"] = _pick(np.random.default_rng([seed, 1]), ["none", "head", "full"], [3, 1, 1])

    start = _pick(rng, ["random", "upcycle", "checkpoint"], [7, 2, 1])
    experts = int(_pick(rng, [0, 2, 4, 8, 16], [1, 2, 3, 2, 1])) if start != "upcycle" else int(_pick(rng, [2, 4, 8]))
    c["moe.num_experts"] = experts
    if experts:
        c["moe.top_k"] = int(rng.integers(1, min(3, experts) + 1))
        c["moe.expert_ffn_dim"] = int(_pick(rng, [16, 32, 48]))
        if stages == 1 and rng.random() < 0.3:
            c["moe.first_k_dense"] = first = int(rng.integers(0, layers))
            c["moe.moe_every"] = int(_pick(rng, [n for n in range(1, layers - first + 1) if (layers - first) % n == 0]))
        c["moe.capacity_factor"] = float(_pick(rng, [0.5, 1.0, 1.25, 2.0]))
        c["moe.eval_capacity_factor"] = float(_pick(rng, [1.0, 2.0]))
        c["moe.drop_policy"] = _pick(rng, ["position", "probs"])
        c["moe.dropless"] = bool(rng.random() < 0.25)
        c["moe.dropless_impl"] = _pick(rng, ["auto", "ragged", "padded"])
        c["moe.gate_norm"] = bool(rng.random() < 0.8)
        c["moe.gate_norm_lambda"] = float(_pick(rng, [0.5, 1.0, 2.0]))
        c["moe.gate_norm_ddof"] = int(_pick(rng, [0, 1]))
        c["moe.aux_loss"] = _pick(rng, ["paper", "switch"])
        c["moe.z_loss_coef"] = float(_pick(rng, [0.0, 1e-3], [3, 1]))
        c["moe.routing_impl"] = _pick(rng, ["xla", "pallas"], [5, 1])
        c["aux_coef.mode"] = _pick(rng, ["adaptive", "fixed"], [3, 1])
        family = np.random.default_rng([seed, 2])  # its own stream, as qk_norm's
        if family.random() < 0.3:
            c["moe.num_shared_experts"] = int(family.integers(1, 3))
            # Upcycled shared experts take a quarter or a half of the dense FFN, the routed experts the rest (below).
            c["moe.shared_expert_ffn_dim"] = int(_pick(family, [0, 16])) if start != "upcycle" else ffn // 4
            c["moe.shared_expert_gate"] = _pick(family, ["none", "sigmoid"])
        balancing = np.random.default_rng([seed, 4])  # its own stream, as qk_norm's
        c["moe.balance"] = _pick(balancing, ["aux", "bias", "aux+bias"], [2, 1, 1])
        c["moe.bias_update_rate"] = float(_pick(balancing, [1e-3, 1e-2]))

    seq_len = int(_pick(rng, [32, 64]))
    c["data.seq_len"] = seq_len
    c["data.batch_size"] = batch = int(_pick(rng, [8, 16, 32]))
    c["data.num_streams"] = int(_pick(rng, [n for n in (1, 2, 4, 8) if batch % n == 0]))
    c["data.shuffle_window"] = int(_pick(rng, [0, 64, 4096]))
    if experts:
        c["moe.group_size"] = int(_pick(rng, [0, seq_len // 2, seq_len, 2 * seq_len]))

    c["parallel.mesh"] = mesh
    c["parallel.layout"] = _pick(rng, ["gshard", "edp"])
    c["parallel.zero1"] = bool(rng.random() < 0.3)
    c["parallel.fsdp"] = bool(rng.random() < 0.2)
    if stages > 1:
        if rng.random() < 0.5:
            c["parallel.pipeline_stage_layers"] = _split(rng, layers, stages)
        c["parallel.num_microbatches"] = int(_pick(rng, [m for m in (1, 2, 4) if batch % m == 0]))
        if rng.random() < 0.2:
            c["parallel.stage_remat"] = tuple(_pick(rng, ["none", "dots", "full"]) for _ in range(stages))
        if rng.random() < 0.25:  # a circular schedule: two chunks per device, mostly with the layers and
            c["parallel.pipeline_repeats"] = 2  # microbatches it needs
            enough = [m for m in (2, 4, 8) if m >= stages and batch % m == 0]
            if enough and rng.random() < 0.8:
                c["parallel.num_microbatches"] = int(_pick(rng, enough))
                c["model.num_layers"] = layers = max(layers, 2 * stages)
            if c.get("parallel.pipeline_stage_layers"):
                c["parallel.pipeline_stage_layers"] = _split(rng, layers, 2 * stages) if layers >= 2 * stages else ()

    if start == "upcycle":
        mode = _pick(rng, ["copy", "fine_grained"])
        c["init.upcycle_mode"], c["init.upcycle_noise"] = mode, float(_pick(rng, [0.0, 0.1]))
        slices = 1 if mode == "copy" else 2
        routed = ffn - c.get("moe.num_shared_experts", 0) * ffn // 4
        c["moe.expert_ffn_dim"], c["moe.top_k"] = routed // slices, slices
    if experts:
        _draw_routing(np.random.default_rng([seed, 3]), c)  # its own stream, as qk_norm's
    c["optim.schedule"] = _pick(rng, ["cosine", "wsd", "constant"])
    c["optim.warmup_steps"] = 1
    return {"start": start, "overrides": c}


def _draw_routing(rng, c: dict[str, object]) -> None:
    """Score, routed scale, aux scope and group-limited routing, with room for top_k in the chosen groups."""
    experts, top_k = c["moe.num_experts"], c["moe.top_k"]
    c["moe.score"] = _pick(rng, ["softmax", "sigmoid"])
    c["moe.routed_scale"] = float(_pick(rng, [1.0, 2.5], [3, 1]))
    c["moe.aux_scope"] = _pick(rng, ["batch", "sequence"], [2, 1])
    fits = [(g, t) for g in (2, 4) if experts % g == 0 for t in range(1, g + 1) if top_k <= t * experts // g]
    if fits and c["moe.routing_impl"] != "pallas" and rng.random() < 0.3:
        c["moe.num_groups"], c["moe.top_groups"] = (int(v) for v in _pick(rng, fits))


# The default run keeps one cheap draw, so that the fuzzer itself is exercised: sigmoid scores, the aux loss beside
# the bias, on a (1, 2, 4) gshard mesh from a random start. SKYMOE_LONG=1 adds the paper's layout (pipeline x data
# x EDP, ZeRO-1, an uneven split) upcycled from a dense run into fine-grained and gated shared experts (the draw
# that found a shared gate's collective inside a pipeline cond hanging the step; 2.5x the first's time) and a dense
# bfloat16-parameter pipeline started from another run's checkpoint; SKYMOE_FUZZ=long draws the rest.
FAST_SEEDS = [38]
LONG_SEEDS = [16, 9]


def _flags(overrides: dict[str, object]) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides.items()]


RUN = [
    f"--config.train.steps={STEPS}",
    f"--config.train.checkpoint_every={SAVE_EVERY}",
    "--config.train.keep_checkpoints=0",
    "--config.train.log_every=1",
    "--config.train.eval_every=3",
    "--config.train.eval_batches=2",
    "--config.train.progress=False",
    "--config.metrics.tensorboard=False",
    "--config.metrics.similarity_every=3",
]


def _source_run(workdir, overrides: dict[str, object], capsys) -> None:
    """A 2-step run on one data-parallel mesh that an upcycled or from-checkpoint start reads."""
    one_mesh = {
        "parallel.mesh": (1, -1, 1),
        "parallel.pipeline_stage_layers": (),
        "parallel.stage_remat": (),
        "parallel.num_microbatches": 1,
        "parallel.pipeline_repeats": 1,
    }
    code = main(["train", f"--workdir={workdir}", *_flags({**overrides, **one_mesh}), *RUN, "--config.train.steps=2"])
    assert code == 0, capsys.readouterr().err


def _records(workdir) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))}


def _finite(value) -> bool:
    return bool(np.all(np.isfinite(np.asarray(value, dtype=np.float64))))


@pytest.mark.parametrize("seed", _seeds())
def test_drawn_config_is_refused_or_trains_resumes_evaluates_and_loads(seed, tmp_path, capsys):
    drawn = draw(seed)
    overrides = dict(drawn["overrides"])
    if drawn["start"] == "upcycle":
        dense = {k: v for k, v in overrides.items() if not k.startswith(("init.", "moe.", "aux_coef."))}
        _source_run(tmp_path / "dense", {**dense, "moe.num_experts": 0}, capsys)
        overrides["init.upcycle_from"] = str(tmp_path / "dense")
    elif drawn["start"] == "checkpoint":
        _source_run(tmp_path / "source", overrides, capsys)
        overrides["init.from_checkpoint"] = str(tmp_path / "source")
    flags = _flags(overrides) + RUN
    command = "skymoe train " + " ".join(f"'{f}'" for f in flags)
    try:
        apply_overrides(base_config(), flags)
    except ConfigError as e:
        assert "\n" not in str(e), f"seed {seed}: multi-line refusal\n{command}"
        return  # refused by validation, before anything compiles

    run = tmp_path / "run"
    capsys.readouterr()
    code = main(["train", f"--workdir={run}", *flags])
    err = capsys.readouterr().err
    if code == 2 and not os.path.exists(run / "checkpoints") or code == 2 and not os.listdir(run / "checkpoints"):
        # A refusal that needs the devices (the mesh, the dense checkpoint): one line, before any step.
        assert len(err.strip().splitlines()) == 1 and "non-finite" not in err, f"seed {seed}: {err}\n{command}"
        assert not os.path.exists(run / "metrics.jsonl") or not read_jsonl(run / "metrics.jsonl")
        return
    assert code == 0, f"seed {seed}: exit {code}: {err}\n{command}"
    whole = _records(run)
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm", "alpha", "drop_rate"):
            if whole[step].get(key) is not None:  # a dense model has no alpha or drop rate
                assert _finite(whole[step][key]), f"seed {seed}: {key} at step {step} = {whole[step][key]}\n{command}"
    assert whole[STEPS]["skipped_steps"] == 0 and _finite(whole[STEPS]["eval_loss"])

    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))
    assert main(["train", f"--workdir={resumed}", *flags]) == 0, f"seed {seed}: resume failed\n{command}"
    again = _records(resumed)[STEPS]
    for key in (
        "loss",
        "grad_norm",
        "alpha",
        "drop_rate",
        "expert_load",
        "max_vio",
        "seq_max_vio",
        "expert_bias",
        "eval_loss",
    ):
        assert again.get(key) == whole[STEPS].get(key), f"seed {seed}: resumed {key} differs\n{command}"

    capsys.readouterr()
    assert main(["eval", f"--workdir={run}", "--json"]) == 0, f"seed {seed}: {capsys.readouterr().err}\n{command}"
    assert '"step": 3' in capsys.readouterr().out

    model, config = load_model(str(run))
    tokens = np.random.default_rng(seed).integers(0, config.model.vocab_size, (2, config.data.seq_len), np.int32)
    logits = np.asarray(model(tokens).logits, np.float32)
    assert logits.shape == (2, config.data.seq_len, config.model.vocab_size) and _finite(logits), (
        f"seed {seed}: load_model gave non-finite logits\n{command}"
    )
    jax.clear_caches()  # hundreds of configs in one process: drop the compiled steps of this one
