"""The aux-coefficient study runner (configs/experiments/aux_coef.py): every arm's flags make a valid config that
differs from the default only where the arm says, and the seed-noise verdict follows its stated rule."""

import importlib.util

import pytest

from skymoe_jax.config import load_config

spec = importlib.util.spec_from_file_location("aux_coef_study", "configs/experiments/aux_coef.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


@pytest.mark.parametrize("regime", sorted(study.REGIMES))
def test_every_arm_is_a_valid_config_with_its_own_aux_setting(regime):
    seen = set()
    for arm, flags in study.arms().items():
        command = study.train_command("/tmp/unused", regime, 1, flags)
        overrides = [a for a in command if a.startswith("--config.")]
        c = load_config(overrides=overrides)  # validates
        assert c.train.steps == study.STEPS and c.seed == 1 and c.data.shuffle_seed == 1
        setting = (c.moe.aux_loss, c.aux_coef.mode, c.aux_coef.initial_alpha, c.aux_coef.alpha_max)
        if arm == "none":
            assert c.aux_coef.mode == "fixed" and c.aux_coef.initial_alpha == 0
        else:
            assert c.moe.aux_loss == study.FORMS[arm.split()[0]]
            assert seen.isdisjoint({setting})
        seen.add(setting)
        if regime == "e16":
            assert (c.moe.num_experts, c.moe.group_size) == (16, 2048)
    assert len(seen) == 11 and study.PAPER_ARM in study.arms()


def test_noise_verdict_pairs_seeds_both_arms_finished():
    paper = {0: 2.00, 1: 2.02, 2: 1.98}
    per_arm = {
        study.PAPER_ARM: paper,
        "none": {s: v + d for (s, v), d in zip(paper.items(), [0.10, 0.11, 0.09])},  # worse by far more than any spread
        "eq4 fixed 1e-2": {s: v + d for (s, v), d in zip(paper.items(), [0.03, -0.02, 0.01])},  # mixed signs: noise
        # seed 1 unfinished: paired on seeds 0 and 2 (+0.2 and +0.3), never against seed 1's 2.02
        "switch fixed 1e-2": {0: 2.20, 2: 2.28},
        "switch fixed 1e-3": {2: 1.5},  # one seed: no verdict
    }
    lines = study.noise("eval loss", per_arm, "{:+.3f}")
    assert lines[0] == "eval loss: largest seed spread of any arm 0.080"  # switch fixed 1e-2: 2.20 to 2.28
    assert "none - eq4 adaptive 0.01: +0.100 over 3 seeds" in lines[1] and lines[1].endswith("beyond the seed noise")
    assert lines[2].endswith("within the seed noise")
    assert "switch fixed 1e-2 - eq4 adaptive 0.01: +0.250 over 2 seeds" in lines[3]
    assert "(paired standard error 0.050)" in lines[3] and lines[3].endswith("beyond the seed noise")
    assert len(lines) == 4
    assert study.noise("eval loss", {study.PAPER_ARM: {0: 2.0}}, "{:+.3f}") == [
        "eval loss: the seed noise needs at least two seeds of the paper's arm"
    ]
