"""Paper 000 Theorem 4.1 on mixtures of Gaussian neighbours in several dimensions."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxflow as jf
from jaxflow.data import sparse_neighbours as assumption_4_4_neighbours
from jaxflow.data import tiling_neighbours, width_for_box_mass


def fixed_width_neighbours(n, m=3, side=0.05, width=0.01, seed=0):
    rng = np.random.default_rng(seed)
    lower = rng.uniform(0.1, 0.85, (m, n))
    return jf.GaussianNeighbours(np.full(m, 1 / m), lower, lower + side, np.full(m, width))


@eqx.filter_jit
def _estimate(field, x, M):
    return jf.instability_probability(field, x, M, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n,k", [(2, 8), (3, 5), (4, 4)])
def test_empirical_probability_respects_a_non_vacuous_bound(n, k):
    field = jf.AnalyticField(tiling_neighbours(n, k, 0.01), jf.RectifiedFlow())
    x = jax.random.uniform(jax.random.PRNGKey(n), (128, n))
    M = jnp.array([1.0, 2.0, 5.0])
    r = _estimate(field, x, M)
    assert np.all(np.asarray(r.p_m) >= np.asarray(r.bound) - 1e-12)
    assert float(r.bound[0]) > 0.2  # the bound says something here
    assert np.all(np.diff(np.asarray(r.p_m)) <= 0)  # P_M falls as M grows


def test_log_ebar_matches_dense_jacobian_at_small_n():
    field = jf.AnalyticField(fixed_width_neighbours(3, side=0.3, width=0.1), jf.RectifiedFlow())
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 3))
    r = _estimate(field, x, jnp.array([1.0]))

    @jax.jit
    @jax.vmap
    def dense(xi):
        z = jf.invert(field, xi, rtol=1e-10, atol=1e-10)
        return jf.geometric_mean_singular_value(
            lambda y: jf.generate(field, y, rtol=1e-10, atol=1e-10), z
        )

    np.testing.assert_allclose(jnp.exp(r.log_ebar), dense(x), rtol=1e-4)


def test_m0_grows_as_widths_shrink():
    law = fixed_width_neighbours(64)
    m0 = float(law.theorem_4_3_m0())
    d = float(law.min_box_distance())
    n = 64
    expect = np.exp((d / np.sqrt(n)) ** 2 / (8 * 0.01) + np.log(0.01) + 2 + 3 * np.sqrt(2 / n))
    np.testing.assert_allclose(m0, expect, rtol=1e-10)
    np.testing.assert_allclose(float(law.theorem_4_3_log_m0()), np.log(expect), rtol=1e-12)
    # in log space it stays finite where M_0 overflows
    big = fixed_width_neighbours(64, width=1e-5)
    assert np.isinf(float(big.theorem_4_3_m0()))
    assert np.isfinite(float(big.theorem_4_3_log_m0()))


@eqx.filter_jit
def _sample_200k(law, key):
    """One compile for both one-box laws of a test (same shapes)."""
    return law.sample(key, (200_000,))


@pytest.mark.parametrize("n", [1, 3, 40])
def test_own_box_mass_matches_monte_carlo(n):
    rng = np.random.default_rng(n)
    lower = rng.uniform(-1, 1, (2, n))
    law = jf.GaussianNeighbours(
        [0.5, 0.5], lower, lower + rng.uniform(0.05, 0.3, (2, n)), [0.02, 0.05]
    )
    # each component alone: a one-box law with the same box and width
    for i in range(2):
        one = jf.GaussianNeighbours(
            [1.0], law.lower[i : i + 1], law.upper[i : i + 1], law.widths[i : i + 1]
        )
        xi = np.asarray(_sample_200k(one, jax.random.PRNGKey(100 + i)))
        lo, hi = np.asarray(law.lower[i]), np.asarray(law.upper[i])
        inside = np.mean(np.all((xi >= lo) & (xi <= hi), -1))
        mass = float(law.own_box_mass()[i])
        assert abs(inside - mass) < 4 * np.sqrt(mass * (1 - mass) / 200_000) + 1e-9


@pytest.mark.parametrize("n", [2, 64, 1024])
def test_assumption_4_4_law_keeps_its_box_mass_as_n_grows(n):
    law = assumption_4_4_neighbours(n, m=3, side=0.05, alpha=0.5, seed=n)
    np.testing.assert_allclose(law.own_box_mass(), 0.5, rtol=1e-9)
    assert float(law.min_box_distance()) >= 0.05  # separated boxes
    assert float(law.widths[0]) == pytest.approx(width_for_box_mass(n, 0.05, 0.5))
    assert np.all(np.asarray(law.lower) >= 0.1) and np.all(np.asarray(law.upper) <= 0.9)
