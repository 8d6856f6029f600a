"""The balancing study runner (configs/experiments/balance.py): every arm's flags make a valid config in every regime
that differs from the regime's config only in its balancing settings, and no two arms of a regime are the same."""

import importlib.util

import numpy as np
import pytest

from skymoe_jax.config import DEFAULT_CONFIG, load_config
from skymoe_jax.metrics import study as study_lib

spec = importlib.util.spec_from_file_location("balance_study", "configs/experiments/balance.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


def _config(regime: str, flags: list[str]):
    command = study.train_command("/tmp/unused", regime, 1, flags)
    path = [a.split("=", 1)[1] for a in command if a.startswith("--config=")]
    return load_config(path[0] if path else DEFAULT_CONFIG, overrides=[a for a in command if a.startswith("--config.")])


@pytest.mark.parametrize("regime", sorted(study.REGIMES))
def test_every_arm_is_a_valid_config_with_its_own_balancing(regime):
    seen = set()
    for arm, flags in study.arms().items():
        c = _config(regime, flags)  # validates
        assert c.train.steps == study.STEPS[regime] and c.seed == 1 and c.data.shuffle_seed == 1
        e = c.moe
        assert (e.num_experts, e.top_k) == ((8, 2) if regime == "e8" else (64, 8))
        assert e.dropless == regime.endswith("dropless")
        assert e.gate_norm == (not arm.endswith("no gn")) and e.gate_norm_lambda == 1.0
        assert ("bias" in e.balance) == arm.startswith("bias")
        assert ("aux" in e.balance) == (not arm.startswith("bias ")), arm  # `bias 1e-3`: the bias alone
        assert (e.aux_scope == "sequence") == arm.startswith("seq")
        if arm == "none":
            assert c.aux_coef.mode == "fixed" and c.aux_coef.initial_alpha == 0
        elif "aux" in e.balance:
            assert e.aux_loss == ("switch" if "switch" in arm else "paper")
            assert c.aux_coef.mode == ("fixed" if "fixed" in arm else "adaptive")
        setting = (e.balance, e.bias_update_rate if "bias" in e.balance else None, e.gate_norm, e.aux_scope)
        setting += (e.aux_loss, c.aux_coef.mode, c.aux_coef.initial_alpha) if "aux" in e.balance else ()
        assert setting not in seen, arm
        seen.add(setting)
    assert len(seen) == 14 and study.PAPER_ARM in study.arms()


oscillation_spec = importlib.util.spec_from_file_location("oscillation", "configs/experiments/bias_oscillation.py")
oscillation = importlib.util.module_from_spec(oscillation_spec)
oscillation_spec.loader.exec_module(oscillation)


def test_the_oscillation_runs_log_every_step_with_the_bias_alone_at_each_rate():
    for arm, flags in oscillation.arms().items():
        command = oscillation.train_command("/tmp/unused", "f64", 0, flags)
        path = [a.split("=", 1)[1] for a in command if a.startswith("--config=")][0]
        c = load_config(path, overrides=[a for a in command if a.startswith("--config.")])
        assert (c.moe.num_experts, c.moe.top_k, c.moe.balance) == (64, 8, "bias")
        assert c.train.log_every == 1 and c.train.eval_every == c.train.steps == oscillation.STEPS
        assert arm == f"bias {c.moe.bias_update_rate:.0e}".replace("e-0", "e-")


def test_step_to_step_statistics_of_an_overshooting_and_a_steady_load():
    """Two experts that swap the load every step: each moves by the whole swing and its error flips sign (lag-1
    autocorrelation -1); a load that does not move: no move, no change of the busiest."""
    swing = np.array([[[0.75, 0.25]], [[0.25, 0.75]]] * 5)  # [steps, layers, experts]
    stats = oscillation.step_to_step(swing, np.full((10, 1), 0.1))
    assert stats["load move / uniform"] == pytest.approx(0.5 * 2)
    assert stats["lag-1 autocorrelation"] == pytest.approx(-0.9)  # 9 pairs over 10 squares, every pair opposite
    assert stats["busiest changes"] == 1 and stats["above 2x uniform %"] == 0 and stats["drop move (points)"] == 0
    steady = oscillation.step_to_step(
        np.tile([[[0.7, 0.3]]], (10, 1, 1)) + 1e-3 * np.arange(10)[:, None, None] * [1, -1], np.full((10, 1), 0.1)
    )
    assert steady["busiest changes"] == 0 and steady["load move / uniform"] == pytest.approx(1e-3 * 2)
    assert steady["lag-1 autocorrelation"] > 0.5


def test_an_unknown_arm_name_is_one_line_naming_the_arms(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("sys.argv", ["balance.py", f"--out={tmp_path}", "--arms=bias 1e-3,bias 1e-4"])
    with pytest.raises(SystemExit) as exit_:
        study_lib.main(study)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no arm named 'bias 1e-4'" in err and "bias+eq4 adaptive" in err
    assert not list(tmp_path.iterdir())  # nothing trained
