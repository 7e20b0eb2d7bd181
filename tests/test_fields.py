"""Field identities for every law on every path, at hypothesis-drawn (x, t).

- Tweedie: `x = alpha D + sigma Zhat`.
- The score is the gradient of the closed-form marginal log density.
- The velocity solves the continuity equation
  `d/dt log p_t + div v + v . grad log p_t = 0`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DENSITY_LAWS, LAWS, PATHS
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxflow as jf

N = 3


@eqx.filter_jit
def _residuals(field, x, t):
    path = field.path
    d, s = field.denoise(x, t), field.score(x, t)
    tweedie = x - (path.alpha(t) * d + path.sigma(t) * field.noise(x, t))
    grad_logp = jax.grad(field.log_prob)(x, t)
    dlogp_dt = jax.grad(field.log_prob, argnums=1)(x, t)
    v = field.velocity(x, t)
    continuity = dlogp_dt + field.divergence(x, t) + jnp.dot(v, grad_logp)
    scale = 1 + jnp.abs(dlogp_dt) + jnp.abs(field.divergence(x, t)) + jnp.abs(jnp.dot(v, grad_logp))
    return tweedie, s - grad_logp, continuity / scale, s


@pytest.mark.parametrize("path_name", sorted(PATHS))
@pytest.mark.parametrize("law_name", sorted(LAWS))
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), frac=st.floats(0.03, 0.97))
def test_field_identities(law_name, path_name, seed, frac):
    rng = np.random.default_rng(seed)
    law = LAWS[law_name](rng, N)
    path = PATHS[path_name]
    field = jf.AnalyticField(law, path)
    t = jnp.asarray(frac * path.t_noise)
    x0 = law.sample(jax.random.PRNGKey(seed % 1000), ())
    x = path.alpha(t) * x0 + path.sigma(t) * jnp.asarray(rng.standard_normal(N))
    tweedie, score_err, continuity, s = _residuals(field, x, t)
    scale = 1 + float(jnp.max(jnp.abs(s)))
    np.testing.assert_allclose(tweedie, 0, atol=1e-8 * (1 + float(jnp.max(jnp.abs(x)))))
    np.testing.assert_allclose(score_err, 0, atol=1e-7 * scale)
    np.testing.assert_allclose(continuity, 0, atol=1e-6)


@pytest.mark.parametrize("path_name", sorted(PATHS))
@pytest.mark.parametrize("law_name", DENSITY_LAWS)
def test_velocity_finite_at_both_ends(law_name, path_name):
    law = LAWS[law_name](np.random.default_rng(0), N)
    path = PATHS[path_name]
    field = jf.AnalyticField(law, path)
    x = jnp.array([0.3, -0.2, 1.5])
    for t in (path.t_data, path.t_noise):
        assert bool(jnp.all(jnp.isfinite(field.velocity(x, t))))
        assert bool(jnp.all(jnp.isfinite(field.denoise(x, t))))


def test_neighbours_log_prob_finite_in_high_dimension():
    rng = np.random.default_rng(1)
    n = 4096
    lower = rng.uniform(0, 0.9, (4, n))
    law = jf.GaussianNeighbours(np.full(4, 0.25), lower, lower + 0.05, np.full(4, 0.02))
    field = jf.AnalyticField(law, jf.RectifiedFlow())
    x = jnp.asarray(rng.uniform(0, 1, n))
    for t in (0.0, 0.5, 1.0):
        assert bool(jnp.isfinite(field.log_prob(x, t)))
        assert bool(jnp.all(jnp.isfinite(field.velocity(x, t))))
    gm = jf.GaussianMixture(np.full(4, 0.25), lower, np.full(4, 1e-3))
    assert bool(jnp.isfinite(gm.log_prob(x)))
    assert float(gm.log_prob(x)) < -1e5  # would underflow to 0 outside log space


def test_neighbours_density_matches_quadrature():
    """1-D: the closed form equals numerical convolution of the box with the Gaussian."""
    law = jf.GaussianNeighbours(
        jnp.array([0.4, 0.6]),
        jnp.array([[-1.0], [0.5]]),
        jnp.array([[-0.2], [1.5]]),
        jnp.array([0.1, 0.3]),
    )
    path = jf.RectifiedFlow()
    t = 0.4
    a, s = float(path.alpha(t)), float(path.sigma(t))
    x = np.linspace(-3, 3, 13)
    # the reference quadrature in NumPy, independent of jaxflow's JAX code
    u = np.linspace(-1, 1.5, 20001)
    du = u[1] - u[0]
    f = 0.4 * ((u >= -1) & (u <= -0.2)) / 0.8 + 0.6 * ((u >= 0.5) & (u <= 1.5)) / 1.0
    w = np.where(u < 0, 0.1, 0.3)
    tau = np.sqrt(a**2 * w**2 + s**2)
    dens = (
        np.sum(
            f[None]
            * np.exp(-0.5 * ((x[:, None] - a * u[None]) / tau) ** 2)
            / (np.sqrt(2 * np.pi) * tau),
            axis=1,
        )
        * du
    )
    closed = np.exp(
        jax.jit(jax.vmap(lambda xi: law.marginal_log_prob(xi[None], a, s)))(jnp.asarray(x))
    )
    np.testing.assert_allclose(closed, dens, rtol=2e-3, atol=1e-6)


def test_laws_sample_moments():
    rng = np.random.default_rng(2)
    law = LAWS["mixture_full"](rng, 2)
    xs = law.sample(jax.random.PRNGKey(0), (200_000,))
    mean = law.weights @ law.means
    np.testing.assert_allclose(xs.mean(0), mean, atol=0.02)
    emp = jf.Empirical(jnp.array([[0.0, 1.0], [2.0, 3.0]]), jnp.array([0.25, 0.75]))
    ys = emp.sample(jax.random.PRNGKey(1), (100_000,))
    np.testing.assert_allclose(ys.mean(0), [1.5, 2.5], atol=0.02)
