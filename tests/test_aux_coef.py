"""The adaptive aux-coefficient rule against a plain numpy simulation."""

import jax.numpy as jnp
import numpy as np

from skymoe_jax.training.aux_coef import update_alpha


def test_adaptive_rule_matches_numpy_over_200_steps():
    rng = np.random.default_rng(0)
    layers, steps = 6, 200
    xi, beta, alpha_max = 0.2, 0.99, 0.01
    # Drop rates spanning both regimes: below and above the alpha_max / xi = 5% saturation point.
    drops = rng.uniform(0.0, 0.12, size=(steps, layers)).astype(np.float32)
    expected = np.full(layers, 0.001, np.float64)
    alpha = jnp.full((layers,), 0.001, jnp.float32)
    for d in drops:
        expected = beta * expected + (1 - beta) * np.minimum(xi * d.astype(np.float64), alpha_max)
        alpha = update_alpha(alpha, jnp.asarray(d), mode="adaptive", xi=xi, beta=beta, alpha_max=alpha_max)
    # 200 float32 EMA steps accumulate at most ~200 ulps of relative error on values ~1e-3.
    np.testing.assert_allclose(np.asarray(alpha), expected, rtol=1e-5, atol=1e-9)


def test_adaptive_rule_converges_to_clipped_target():
    alpha = jnp.zeros((2,), jnp.float32)
    for _ in range(3000):  # 0.99^3000 ~ 1e-13: fully converged
        alpha = update_alpha(alpha, jnp.array([0.01, 0.30]), mode="adaptive", xi=0.2, beta=0.99, alpha_max=0.01)
    np.testing.assert_allclose(np.asarray(alpha), [0.002, 0.01], rtol=1e-4)


def test_fixed_mode_keeps_alpha():
    alpha = jnp.array([0.003, 0.004])
    out = update_alpha(alpha, jnp.array([0.5, 0.5]), mode="fixed", xi=0.2, beta=0.99, alpha_max=0.01)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(alpha))
