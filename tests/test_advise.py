"""The upcycle-or-scratch rule of thumb against hand-computed costs."""

import json

import pytest

from skymoe_jax.advise import advise
from skymoe_jax.cli import main
from skymoe_jax.errors import ConfigError


def test_costs_and_factor_by_hand():
    a = advise(3e8, 3e11, 1e11, top_k=2, ffn_share=2 / 3, comm_overhead=1.2)
    assert a.cost_factor == pytest.approx((1 + 2 / 3) * 1.2)
    assert a.dense_cost == pytest.approx(6 * 3e8 * 3e11)
    assert a.moe_cost == pytest.approx(6 * 3e8 * 2.0 * 1e11)
    assert a.recommendation == "upcycle"  # 0.67x the dense cost: the paper's winning upcycled setting


@pytest.mark.parametrize(
    "dense_tokens,moe_tokens,have,expected",
    [
        (3e11, 3e11, True, "scratch"),  # exactly 2x
        (1e11, 3e11, True, "scratch"),  # 6x
        (3e11, 2e11, True, "either"),  # 1.33x
        (3e11, 1e10, False, "scratch"),  # no dense model
    ],
)
def test_regimes(dense_tokens, moe_tokens, have, expected):
    assert advise(3e8, dense_tokens, moe_tokens, have_dense=have).recommendation == expected


def test_cli(capsys):
    assert main(["advise", "--dense_params=0.3B", "--dense_tokens=300B", "--moe_tokens=100B", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recommendation"] == "upcycle" and out["ratio"] == pytest.approx(2 / 3)
    assert main(["advise", "--dense_params=0.3B", "--dense_tokens=300B"]) == 2
    assert "needs --moe_tokens" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        advise(-1, 1, 1)
