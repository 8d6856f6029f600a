"""`skymoe bench step --peer=hf`: the PyTorch peer is the same model (parameter for parameter), trains,
and is timed beside the skymoe step; without torch the command says what to install. `skymoe bench
layers` times every block of the model."""

import json
import sys

import numpy as np
import pytest

from skymoe_jax.bench.paired import paired_ratio
from skymoe_jax.bench.peer import TIMED_PER_TURN, _Worker, take_turns
from skymoe_jax.cli import main
from skymoe_jax.config import load_config
from skymoe_jax.metrics.flops import param_counts
from skymoe_jax.model.spec import ModelSpec

TINY = [
    "--config.model.d_model=32",
    "--config.model.num_layers=2",
    "--config.model.num_heads=4",
    "--config.model.num_kv_heads=2",
    "--config.model.ffn_dim=48",
    "--config.moe.expert_ffn_dim=24",
    "--config.moe.num_experts=4",
    "--config.data.seq_len=32",
    "--config.data.batch_size=8",
    "--config.data.num_streams=8",
    "--config.moe.group_size=0",
]


@pytest.mark.parametrize(
    "overrides", [[], [*TINY, "--config.moe.num_experts=4"], [*TINY, "--config.moe.num_experts=0"]]
)  # [] = the default config, the one the benchmark compares
def test_the_peer_has_the_same_parameters_and_trains(overrides):
    pytest.importorskip("torch", reason="torch is not installed: pip install -e '.[hf]'")
    pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[hf]'")
    from skymoe_jax.bench.peer import peer_model, peer_step_fn
    from skymoe_jax.bench.step import random_tokens

    config = load_config("configs/default.py", overrides)
    model, _ = peer_model(config)
    assert sum(p.numel() for p in model.parameters()) == param_counts(ModelSpec.from_config(config)).total
    step = peer_step_fn(config, random_tokens(config))
    losses = [step() for _ in range(3)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_bench_step_against_the_peer(capsys):
    pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[hf]'")
    assert main(["bench", "step", "--peer=hf", "--steps=4", "--json", *TINY]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["peer"] == "transformers MixtralForCausalLM"
    low, high = result["speedup_interval"]
    assert result["rounds"] == 4 // TIMED_PER_TURN and low <= result["speedup"] <= high
    for side in ("skymoe", "peer"):
        assert 0 < result[f"{side}_min_step_s"] <= result[f"{side}_step_s"]
        assert result[f"{side}_first_step_s"] > 0
    assert result["skymoe_tokens_per_sec"] == pytest.approx(8 * 32 / result["skymoe_step_s"])
    assert result["skymoe_peak_rss"] > 0 and result["peer_peak_rss"] > 0


def test_turns_alternate_and_leave_each_turns_first_step_untimed():
    calls = []

    def step(side):  # a step right after the other side's is slow, as on the development VM
        slow = bool(calls) and calls[-1] != side
        calls.append(side)
        return 10.0 if slow else 1.0

    timed, first = take_turns(step, ["a", "b"], 5)
    rounds = -(-5 // TIMED_PER_TURN)
    turn = 1 + TIMED_PER_TURN
    assert calls == [
        side for r in range(rounds) for side in (("a", "b") if r % 2 == 0 else ("b", "a")) for _ in range(turn)
    ]
    assert timed == {"a": [[1.0] * TIMED_PER_TURN] * rounds, "b": [[1.0] * TIMED_PER_TURN] * rounds}
    # The side going second in a round follows the other; the one going first follows itself (or nothing).
    assert first == {
        "a": [10.0 if r % 2 else 1.0 for r in range(rounds)],
        "b": [1.0 if r % 2 else 10.0 for r in range(rounds)],
    }


def test_a_failed_benchmark_worker_says_why(tmp_path):
    script = "import sys; print('a library talking'); sys.stderr.write('the reason'); sys.exit(3)"
    with open(tmp_path / "log", "w+") as log:
        worker = _Worker("hf", [sys.executable, "-c", script], log)
        with pytest.raises(RuntimeError, match="the hf benchmark worker failed: the reason"):
            worker.ask()
        worker.close()


def test_paired_ratio_against_numpy():
    peer = np.array([3.0, 3.3, 2.9, 6.0, 3.1, 3.2, 3.0])
    ours = np.array([3.0, 3.0, 2.9, 3.0, 3.5, 3.1, 2.5])  # round 4: the machine stalled the peer's step
    ratio = paired_ratio(peer, ours)
    ratios = peer / ours
    assert ratio.median == pytest.approx(np.median(ratios)) and ratio.rounds == 7
    # The interval of a median lies within the spread of the rounds and holds the estimate.
    assert ratios.min() <= ratio.low <= ratio.median <= ratio.high <= ratios.max()
    assert ratio.high < 2.0  # the one stalled round does not carry the interval
    assert paired_ratio(peer, ours) == ratio  # seeded: the same rounds give the same interval
    assert paired_ratio([2.0] * 5, [1.0] * 5)[:3] == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="same positive number of rounds"):
        paired_ratio([], [])


def test_peer_without_torch_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    assert main(["bench", "step", "--peer=hf", *TINY]) == 2
    err = capsys.readouterr().err
    assert "pip install" in err and len(err.strip().splitlines()) == 1
    assert main(["bench", "step", "--peer=pytorch", *TINY]) == 2
    assert "--peer='pytorch'" in capsys.readouterr().err


def test_bench_layers_times_every_block_of_the_model(capsys):
    assert main(["bench", "layers", "--repeats=1", "--json", *TINY, "--config.moe.first_k_dense=1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["ms"]) == {"attention", "moe", "dense_ffn", "head_and_loss"}
    ms = result["ms"]  # 2 layers: one dense, one MoE
    want = 2 * ms["attention"] + ms["moe"] + ms["dense_ffn"] + ms["head_and_loss"]
    assert result["blocks_per_step_ms"] == pytest.approx(want)
