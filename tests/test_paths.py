"""Path coefficients against autodiff and the docs/mathematics.md §2 identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import PATHS, make_mixture
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxflow as jf


@pytest.mark.parametrize("name", sorted(PATHS))
@settings(max_examples=20, deadline=None)
@given(frac=st.floats(0.001, 0.999))
def test_derivatives_match_autodiff(name, frac):
    path = PATHS[name]
    t = jnp.asarray(frac * path.t_noise)
    np.testing.assert_allclose(path.d_alpha(t), jax.grad(path.alpha)(t), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(path.d_sigma(t), jax.grad(path.sigma)(t), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(
        path.sigma_d_sigma(t), path.sigma(t) * path.d_sigma(t), rtol=1e-8, atol=1e-12
    )
    # g^2 = d sigma^2/dt - 2 f sigma^2 (docs/mathematics.md §2)
    g2 = (
        jax.grad(lambda s: path.sigma(s) ** 2)(t)
        - 2 * path.d_alpha(t) / path.alpha(t) * path.sigma(t) ** 2
    )
    np.testing.assert_allclose(path.diffusion_squared(t), g2, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_ends_of_the_path(name):
    path = PATHS[name]
    assert float(path.alpha(0.0)) == pytest.approx(1.0, abs=1e-12)
    assert float(path.sigma(0.0)) == pytest.approx(0.0, abs=1e-12)
    assert bool(jnp.isfinite(path.sigma_d_sigma(0.0)))
    if name == "ornstein_uhlenbeck":
        assert float(path.alpha(path.t_noise)) == pytest.approx(np.exp(-path.t_noise))
    else:
        assert float(path.alpha(path.t_noise)) == pytest.approx(0.0, abs=1e-12)
        assert float(path.sigma(path.t_noise)) == pytest.approx(1.0, abs=1e-12)


def test_cosine_without_offset_is_the_variance_preserving_interpolant():
    path = jf.Cosine(0.0)
    t = jnp.linspace(0, 1, 11)
    np.testing.assert_allclose(path.alpha(t), jnp.cos(jnp.pi * t / 2), atol=1e-12)
    np.testing.assert_allclose(path.sigma(t), jnp.sin(jnp.pi * t / 2), atol=1e-12)
    np.testing.assert_allclose(path.d_sigma(t), jnp.pi / 2 * jnp.cos(jnp.pi * t / 2), atol=1e-12)
    np.testing.assert_allclose(path.d_alpha(t), jax.vmap(jax.grad(path.alpha))(t), atol=1e-12)
    assert float(path.d_sigma(0.0)) == pytest.approx(np.pi / 2)
    with pytest.raises(ValueError, match=">= 0"):
        jf.Cosine(-0.1)


def test_cosine_matches_its_definition():
    d = 0.008
    path = jf.Cosine(d)
    t = jnp.linspace(0, 1, 11)

    def f(s):
        return jnp.cos(0.5 * jnp.pi * (s + d) / (1 + d)) ** 2

    np.testing.assert_allclose(path.alpha(t) ** 2, f(t) / f(0.0), atol=1e-12)
    np.testing.assert_allclose(path.sigma(t) ** 2, 1 - f(t) / f(0.0), atol=1e-12)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_reverse_drift_is_f_x_minus_g2_s(name):
    path = PATHS[name]
    field = jf.AnalyticField(make_mixture(np.random.default_rng(0), 3), path)
    x = jnp.array([0.2, -0.4, 0.9])
    t = 0.4 * path.t_noise
    expect = path.drift_coefficient(t) * x - path.diffusion_squared(t) * field.score(x, t)
    np.testing.assert_allclose(field.reverse_drift(x, t), expect, rtol=1e-10, atol=1e-10)
