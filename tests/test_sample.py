"""The DDPM step (paper 002 Prop. 4.3) against eq. 4.21, the marginals of every
path, and Theorem 2's closed form for a Dirac target."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    PATHS,
    make_mixture,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxflow as jf


@settings(max_examples=30, deadline=None)
@given(t=st.floats(1e-3, 8.0), frac=st.floats(1e-4, 1.0))
def test_ou_step_is_eq_4_21_and_eq_4_23(t, frac):
    """Eq. 4.23-4.24 (docs/mathematics.md §5) and the sinh form eq. 4.21 are the same step."""
    h = frac * t
    tn = t - h
    c_x, c_0, var = jf.ddpm_coefficients(jf.OrnsteinUhlenbeck(10.0), t, tn)
    # eq. 4.21: sinh(t') / sinh(t) x + sinh(h) / sinh(t) x0 + sqrt(2 sinh(t') sinh(h) / sinh(t)) eps
    np.testing.assert_allclose(c_x, np.sinh(tn) / np.sinh(t), rtol=1e-9)
    np.testing.assert_allclose(c_0, np.sinh(h) / np.sinh(t), rtol=1e-9)
    np.testing.assert_allclose(
        var, 2 * np.sinh(tn) * np.sinh(h) / np.sinh(t), rtol=1e-9, atol=1e-300
    )
    e = np.exp
    np.testing.assert_allclose(c_x, e(-h) * (1 - e(-2 * tn)) / (1 - e(-2 * t)), rtol=1e-9)
    np.testing.assert_allclose(c_0, e(-tn) * (1 - e(-2 * h)) / (1 - e(-2 * t)), rtol=1e-9)
    np.testing.assert_allclose(
        var, (1 - e(-2 * tn)) * (1 - e(-2 * h)) / (1 - e(-2 * t)), rtol=1e-9, atol=1e-300
    )


@settings(max_examples=30, deadline=None)
@given(
    path=st.sampled_from(sorted(PATHS)),
    u=st.floats(0.02, 1.0),
    frac=st.floats(0.0, 0.999),
)
def test_step_carries_the_marginal_given_x0(path, u, frac):
    """If X_t ~ N(alpha_t x0, sigma_t^2) then the step with x0_bar = x0 gives
    X_{t'} ~ N(alpha_{t'} x0, sigma_{t'}^2): the Chapman-Kolmogorov identity of the
    path, independent of how the posterior was derived."""
    p = PATHS[path]
    t = u * p.t_noise
    tn = frac * t
    c_x, c_0, var = jf.ddpm_coefficients(p, t, tn)
    np.testing.assert_allclose(c_x * p.alpha(t) + c_0, p.alpha(tn), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        c_x**2 * p.sigma(t) ** 2 + var, p.sigma(tn) ** 2, rtol=1e-9, atol=1e-12
    )
    assert var >= 0


def _theorem_2(T, s, start, x0):
    """Paper 002 eq. 4.12: mean and variance of X_s given X_0 = start."""
    sh = np.sinh
    mean = sh(T - s) / sh(T) * start + sh(s) / sh(T) * x0
    return mean, 2 * sh(T - s) * sh(s) / sh(T)


def test_dirac_target_sample_ddpm_is_theorem_2():
    """With a Dirac target the denoiser is constant, so DDPM steps are exact at any
    step count: the composed affine steps give eq. 4.12's mean and variance, and
    4000 samples pass a z-test on both."""
    T, x0, start = 3.0, jnp.array([1.0, -0.5]), jnp.array([2.0, 1.0])
    field = jf.AnalyticField(jf.Empirical(x0[None]), jf.OrnsteinUhlenbeck(T))
    for s, steps in ((0.7, 3), (2.0, 11), (2.9, 40)):
        # propagate mean and variance through the steps in closed form
        grid = np.linspace(T, T - s, steps + 1)
        mean, var = np.asarray(start), 0.0
        for t, tn in zip(grid[:-1], grid[1:], strict=True):
            c_x, c_0, v = (float(c) for c in jf.ddpm_coefficients(field.path, t, tn))
            mean, var = c_x * mean + c_0 * np.asarray(x0), c_x**2 * var + v
        m_ref, v_ref = _theorem_2(T, s, np.asarray(start), np.asarray(x0))
        np.testing.assert_allclose(mean, m_ref, rtol=1e-12)
        np.testing.assert_allclose(var, v_ref, rtol=1e-12)
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    s, steps = 2.0, 11
    xs = jax.jit(
        jax.vmap(lambda k: jf.sample_ddpm(field, start, k, steps=steps, t_noise=T, t_data=T - s))
    )(keys)
    m_ref, v_ref = _theorem_2(T, s, np.asarray(start), np.asarray(x0))
    xs = np.asarray(xs)
    z_mean = (xs.mean(0) - m_ref) / np.sqrt(v_ref / len(xs))
    z_var = (xs.var(0, ddof=1) - v_ref) / (v_ref * np.sqrt(2 / (len(xs) - 1)))
    assert np.all(np.abs(z_mean) < 4.5) and np.all(np.abs(z_var) < 4.5), (z_mean, z_var)
    again = jf.sample_ddpm(field, start, keys[0], steps=steps, t_noise=T, t_data=T - s)
    np.testing.assert_array_equal(again, xs[0])
    # a given grid: the equal one reproduces steps=, and a geometric one is exact too
    equal = np.linspace(T - s, T, steps + 1)
    np.testing.assert_allclose(
        jf.sample_ddpm(field, start, keys[0], times=equal), xs[0], rtol=1e-12, atol=1e-12
    )
    geometric = np.geomspace(T - s, T, 7)
    xs = np.asarray(
        jax.jit(jax.vmap(lambda k: jf.sample_ddpm(field, start, k, times=geometric)))(keys)
    )
    z_mean = (xs.mean(0) - m_ref) / np.sqrt(v_ref / len(xs))
    z_var = (xs.var(0, ddof=1) - v_ref) / (v_ref * np.sqrt(2 / (len(xs) - 1)))
    assert np.all(np.abs(z_mean) < 4.5) and np.all(np.abs(z_var) < 4.5), (z_mean, z_var)
    with pytest.raises(ValueError, match="increase strictly"):
        jf.sample_ddpm(field, start, keys[0], times=geometric[::-1])


def test_last_step_to_the_data_end_returns_the_denoiser():
    field = jf.AnalyticField(
        jf.Empirical(jnp.array([[0.0, 0.0], [3.0, 1.0]])), jf.OrnsteinUhlenbeck()
    )
    x = jf.sample_ddpm(field, jnp.array([2.5, 0.4]), jax.random.PRNGKey(1), steps=50)
    # ends on a training point (paper 002 Corollary 3.3): the posterior is one-hot
    # that close to the data
    d = jnp.min(jnp.linalg.norm(x - field.law.points, axis=1))
    assert d < 1e-8


def test_bad_input_raises():
    p = jf.OrnsteinUhlenbeck()
    with pytest.raises(ValueError, match="t_next <= t"):
        jf.ddpm_coefficients(p, 0.5, 1.0)
    # t_next = t is the step that does not move
    np.testing.assert_allclose(jf.ddpm_coefficients(p, 1.0, 1.0), (1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="data end"):
        jf.ddpm_coefficients(p, 1.0, -0.1)
    with pytest.raises(ValueError, match="noise end"):
        jf.ddpm_coefficients(p, 6.0, 1.0)
    field = jf.AnalyticField(jf.Empirical(jnp.zeros((1, 2))), p)
    with pytest.raises(ValueError, match="towards the data"):
        jf.sample_ddpm(field, jnp.zeros(2), jax.random.PRNGKey(0), t_noise=0.5, t_data=1.0)
    with pytest.raises(ValueError, match="steps"):
        jf.sample_ddpm(field, jnp.zeros(2), jax.random.PRNGKey(0), steps=0)
    with pytest.raises(ValueError, match="one point"):
        jf.sample_ddpm(field, jnp.zeros((3, 2)), jax.random.PRNGKey(0))


def test_reverse_sde_matches_gaussian_law():
    rng = np.random.default_rng(5)
    law = make_mixture(rng, 2, 1, "full")
    field = jf.AnalyticField(law, jf.OrnsteinUhlenbeck(5.0))
    keys = jax.random.split(jax.random.PRNGKey(3), 4000)
    zs = jax.random.normal(jax.random.PRNGKey(4), (4000, 2))
    xs = jax.jit(jax.vmap(lambda z, k: jf.sample_sde(field, z, k, steps=400)))(zs, keys)
    cov = law.covariances[0]
    stderr = np.sqrt(np.diag(cov) / len(xs))
    assert np.all(np.abs(np.asarray(xs.mean(0) - law.means[0])) < 5 * stderr + 0.01)
    np.testing.assert_allclose(np.cov(np.asarray(xs).T), cov, atol=0.1 * np.max(np.abs(cov)) + 0.02)
    # jitted once: eagerly, each call traced and compiled its 400-step loop again
    one = jax.jit(lambda z, k: jf.sample_sde(field, z, k, steps=400))
    np.testing.assert_array_equal(one(zs[0], keys[0]), one(zs[0], keys[0]))


def test_reverse_sde_step_chain_reaches_the_gaussian_law():
    """Walking `reverse_sde_step` by hand (as the Lyapunov examples do) samples the
    data law: moments of a 1-D Gaussian on the OU path."""
    law = jf.Gaussian(jnp.array([0.7]), jnp.array([[0.25]]))
    field = jf.AnalyticField(law, jf.OrnsteinUhlenbeck(5.0))
    steps, h = 500, (5.0 - 1e-3) / 500
    noise = jax.random.normal(jax.random.PRNGKey(1), (steps, 4000, 1))

    def body(x, i):
        t = 5.0 - i * h
        step = jax.vmap(lambda xi, ni: jf.reverse_sde_step(field, xi, t, h, ni))
        return step(x, noise[i]), None

    z = jax.random.normal(jax.random.PRNGKey(2), (4000, 1))
    x, _ = jax.lax.scan(body, z, jnp.arange(steps))
    stderr = np.sqrt(0.25 / 4000)
    assert abs(float(x.mean()) - 0.7) < 5 * stderr + 0.01
    assert abs(float(x.var()) - 0.25) < 0.03
