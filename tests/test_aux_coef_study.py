"""The aux-coefficient study runner (configs/experiments/aux_coef.py): every arm's flags make a valid config that
differs from the default only where the arm says, and the seed-noise verdict follows its stated rule."""

import importlib.util

import numpy as np
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


def test_noise_verdict():
    paper = np.array([2.00, 2.02, 1.98])
    finals = {
        study.PAPER_ARM: paper,
        "none": paper + np.array([0.10, 0.11, 0.09]),  # consistently worse by far more than any spread
        "eq4 fixed 1e-2": paper + np.array([0.03, -0.02, 0.01]),  # mixed signs: noise
    }
    lines = study.noise(finals)
    assert lines[0] == "largest seed spread of any arm: 0.060"  # the none arm: 2.07 to 2.13
    assert "none - eq4 adaptive 0.01: +0.100" in lines[1] and lines[1].endswith("beyond the seed noise")
    assert lines[2].endswith("within the seed noise")
    assert study.noise({study.PAPER_ARM: paper[:1]}) == ["(seed noise needs at least two seeds of the paper's arm)"]
