"""The experiment studies' shared runner (skymoe_jax/metrics/study.py): when a run counts as finished, the seed-noise
verdict by its stated rule, and the windowed trajectories the study tables print."""

import json

import numpy as np

from skymoe_jax.metrics import study
from skymoe_jax.metrics.runs import Run

REF = "eq4 adaptive 0.01"


def test_a_run_is_finished_when_it_logged_the_last_steps_evaluation(tmp_path):
    assert not study.finished(str(tmp_path), 10)
    records = [{"step": 5, "eval_loss": 2.0}, {"step": 10, "loss": 1.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert not study.finished(str(tmp_path), 10)  # step 10 logged, but not its evaluation
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 10, "eval_loss": 1.8}) + "\n")
    assert study.finished(str(tmp_path), 10)


def test_noise_verdict_pairs_seeds_both_arms_finished():
    ref = {0: 2.00, 1: 2.02, 2: 1.98}
    per_arm = {
        REF: ref,
        "none": {s: v + d for (s, v), d in zip(ref.items(), [0.10, 0.11, 0.09])},  # worse by far more than any spread
        "eq4 fixed 1e-2": {s: v + d for (s, v), d in zip(ref.items(), [0.03, -0.02, 0.01])},  # mixed signs: noise
        # seed 1 unfinished: paired on seeds 0 and 2 (+0.2 and +0.3), never against seed 1's 2.02
        "switch fixed 1e-2": {0: 2.20, 2: 2.28},
        "switch fixed 1e-3": {2: 1.5},  # one seed: no verdict
    }
    lines = study.noise("eval loss", per_arm, "{:+.3f}", REF)
    assert lines[0] == "eval loss: largest seed spread of any arm 0.080"  # switch fixed 1e-2: 2.20 to 2.28
    assert "none - eq4 adaptive 0.01: +0.100 over 3 seeds" in lines[1] and lines[1].endswith("beyond the seed noise")
    assert lines[2].endswith("within the seed noise")
    assert "switch fixed 1e-2 - eq4 adaptive 0.01: +0.250 over 2 seeds" in lines[3]
    assert "(paired standard error 0.050)" in lines[3] and lines[3].endswith("beyond the seed noise")
    assert len(lines) == 4
    assert study.noise("eval loss", {REF: {0: 2.0}}, "{:+.3f}", REF) == [
        "eval loss: the seed noise needs at least two seeds of eq4 adaptive 0.01"
    ]


def test_windows_average_layers_then_steps_and_drift_compares_the_last_two():
    # Steps 10, 20, ..., 60 with two layers; values per layer [step, step + 2].
    records = [{"step": s, "max_vio": [s, s + 2], "expert_bias": [[0, s], [0, 2 * s]]} for s in range(10, 70, 10)]
    run = Run("r", "/unused", records)
    # Layer means s + 1 per step; windows of 20 steps: (11 + 21) / 2, (31 + 41) / 2, (51 + 61) / 2.
    assert study.windows(run, "max_vio", 20) == [16.0, 36.0, 56.0]
    assert study.drift(run, "max_vio", 20) == (56.0 - 36.0) / 36.0
    # Over the experts first (the spread, max - min: s and 2s per layer, mean 1.5s), then as above.
    assert np.allclose(study.windows(run, "expert_bias", 30, np.ptp), [30.0, 75.0])
