"""The derivatives of a diagonal mixture's posterior (`jaxflow/_laws.py`), written
out by hand so that many tangents at once are matrix products, against autodiff of
the same law given with full covariance matrices (the general route, which
differentiates the direct formula): first and second order, in `x`, in `t` and in
the law's parameters, forward and reverse, at hypothesis-drawn laws and points."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import PATHS
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxflow as jf

N, K = 5, 4


def _pair(rng, kind):
    """The same mixture twice: diagonal (or isotropic) variances, and as full
    matrices."""
    w = rng.uniform(0.2, 1.0, K)
    w = w / w.sum()
    means = rng.uniform(-2, 2, (K, N))
    var = rng.uniform(0.05, 0.5, (K, N) if kind == "diag" else K)
    full = np.stack([np.diag(np.broadcast_to(v, (N,))) for v in var])
    return jf.GaussianMixture(w, means, var), jf.GaussianMixture(w, means, full)


def _velocity(law, path, x, t):
    return jf.AnalyticField(law, path).velocity(x, t)


@pytest.mark.parametrize("kind", ["diag", "iso"])
@pytest.mark.parametrize("path_name", sorted(PATHS))
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), frac=st.floats(0.05, 0.95))
def test_diagonal_mixture_derivatives_match_the_general_route(kind, path_name, seed, frac):
    rng = np.random.default_rng(seed)
    diag, full = _pair(rng, kind)
    path = PATHS[path_name]
    t = jnp.asarray(frac * path.t_noise)
    x = diag.means[rng.integers(K)] * path.alpha(t) + path.sigma(t) * rng.standard_normal(N)
    tol = dict(rtol=1e-9, atol=1e-9)

    def v(law):
        return lambda y, s: _velocity(law, path, y, s)

    np.testing.assert_allclose(v(diag)(x, t), v(full)(x, t), **tol)
    for jac in (jax.jacfwd, jax.jacrev):
        np.testing.assert_allclose(jac(v(diag))(x, t), jac(v(full))(x, t), **tol)
        # in time: the path's coefficients move
        np.testing.assert_allclose(
            jac(v(diag), argnums=1)(x, t), jac(v(full), argnums=1)(x, t), **tol
        )
    # many tangents at once (the batched route the change is for)
    u = jnp.asarray(rng.standard_normal((7, N)))
    np.testing.assert_allclose(
        jax.vmap(lambda d: jax.jvp(lambda y: v(diag)(y, t), (x,), (d,))[1])(u),
        u @ jax.jacfwd(v(full))(x, t).T,
        **tol,
    )
    # second order: the derivative of the Jacobian
    np.testing.assert_allclose(
        jax.jacfwd(jax.jacrev(v(diag)))(x, t), jax.jacfwd(jax.jacrev(v(full)))(x, t), **tol
    )

    # in the law's means (a parameter, by autodiff of the direct formula)
    def through_means(law, covariances):
        def f(mu):
            return _velocity(jf.GaussianMixture(law.weights, mu, covariances), path, x, t)

        return jax.jacfwd(f)(law.means)

    np.testing.assert_allclose(
        through_means(diag, diag.eigvals), through_means(full, full.covariances), **tol
    )


def test_diagonal_mixture_jacobian_stays_finite_beside_a_far_component():
    # a component so far away that its responsibility underflows to 0 and its
    # whitened residual is huge: its row must not turn the tangent into NaN
    rng = np.random.default_rng(0)
    diag, full = _pair(rng, "diag")
    means = diag.means.at[0].set(1e4)
    diag = jf.GaussianMixture(diag.weights, means, diag.eigvals)
    full = jf.GaussianMixture(full.weights, means, full.covariances)
    path = jf.RectifiedFlow()
    x, t = means[1] * 0.7 + 0.1, jnp.asarray(0.3)
    jd = jax.jacfwd(lambda y: _velocity(diag, path, y, t))(x)
    jr = jax.jacrev(lambda y: _velocity(diag, path, y, t))(x)
    jfull = jax.jacfwd(lambda y: _velocity(full, path, y, t))(x)
    assert np.all(np.isfinite(jd)) and np.all(np.isfinite(jr))
    np.testing.assert_allclose(jd, jfull, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(jr, jfull, rtol=1e-9, atol=1e-9)
