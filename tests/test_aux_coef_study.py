"""The aux-coefficient study runner (configs/experiments/aux_coef.py): every arm's flags make a valid config that
differs from the default only where the arm says."""

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
