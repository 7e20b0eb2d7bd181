"""The derivatives of a diagonal mixture's posterior (`jaxflow/_laws.py`), written
out by hand so that many tangents at once are matrix products, against autodiff of
the same law given with full covariance matrices (the general route, which
differentiates the direct formula): first and second order, in `x`, in `t` and in
the law's parameters, forward and reverse, at hypothesis-drawn laws and points."""

import equinox as eqx
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


@eqx.filter_jit
def _derivatives(law, covariances, path, x, t, u):
    """Every derivative the property compares, in one program: laws of the same kind
    and shapes (and the same path) share one compile across examples, where eager
    `jacfwd`/`jacrev` calls compiled each small op again per example."""

    def v(y, s):
        return _velocity(law, path, y, s)

    def f(mu):
        return _velocity(jf.GaussianMixture(law.weights, mu, covariances), path, x, t)

    return dict(
        value=v(x, t),
        jacfwd_x=jax.jacfwd(v)(x, t),
        jacrev_x=jax.jacrev(v)(x, t),
        jacfwd_t=jax.jacfwd(v, argnums=1)(x, t),
        jacrev_t=jax.jacrev(v, argnums=1)(x, t),
        # many tangents at once (the batched route the change is for)
        jvps=jax.vmap(lambda d: jax.jvp(lambda y: v(y, t), (x,), (d,))[1])(u),
        # second order: the derivative of the Jacobian
        hessian=jax.jacfwd(jax.jacrev(v))(x, t),
        # in the law's means (a parameter, by autodiff of the direct formula)
        means=jax.jacfwd(f)(law.means),
    )


@eqx.filter_jit
def _jacobians(law, path, x, t):
    """Forward and reverse Jacobians in `x` in one program (eagerly, each small op
    of the two compiled on its own)."""

    def v(y):
        return _velocity(law, path, y, t)

    return jax.jacfwd(v)(x), jax.jacrev(v)(x)


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
    u = jnp.asarray(rng.standard_normal((7, N)))
    d = _derivatives(diag, diag.eigvals, path, x, t, u)
    g = _derivatives(full, full.covariances, path, x, t, u)

    np.testing.assert_allclose(d["value"], g["value"], **tol)
    for name in ("jacfwd", "jacrev"):
        np.testing.assert_allclose(d[f"{name}_x"], g[f"{name}_x"], **tol)
        # in time: the path's coefficients move
        np.testing.assert_allclose(d[f"{name}_t"], g[f"{name}_t"], **tol)
    np.testing.assert_allclose(d["jvps"], u @ g["jacfwd_x"].T, **tol)
    np.testing.assert_allclose(d["hessian"], g["hessian"], **tol)
    np.testing.assert_allclose(d["means"], g["means"], **tol)


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
    jd, jr = _jacobians(diag, path, x, t)
    jfull, _ = _jacobians(full, path, x, t)
    assert np.all(np.isfinite(jd)) and np.all(np.isfinite(jr))
    np.testing.assert_allclose(jd, jfull, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(jr, jfull, rtol=1e-9, atol=1e-9)
