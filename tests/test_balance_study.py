"""The balancing study runner (configs/experiments/balance.py): every arm's flags make a valid config in every regime
that differs from the regime's config only in its balancing settings, and no two arms of a regime are the same."""

import importlib.util

import pytest

from skymoe_jax.config import DEFAULT_CONFIG, load_config

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
        assert c.train.steps == study.STEPS and c.seed == 1 and c.data.shuffle_seed == 1
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
