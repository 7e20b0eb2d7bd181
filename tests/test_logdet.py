"""Three independent routes to `log |det J_G(z)|` agree (paper 000 Lemma D.1)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SOLVE, make_mixture
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxflow as jf


@eqx.filter_jit
def _routes(field, z):
    return (
        jf.log_det_generation(field, z, route="dense", **SOLVE),
        jf.log_det_generation(field, z, route="divergence", **SOLVE),
        jf.log_det_generation(field, z, route="density", **SOLVE),
    )


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["full", "diag", "iso"]))
def test_three_routes_agree_on_mixtures(seed, kind):
    """One shape (n = 3, k = 2): the drawn laws share one compilation per kind;
    the values are what is drawn (other n: test_closed_form_divergence_equals_trace)."""
    n = 3
    rng = np.random.default_rng(seed)
    law = make_mixture(rng, n, 2, kind)
    field = jf.AnalyticField(law, jf.RectifiedFlow())
    z = jnp.asarray(rng.standard_normal(n))
    dense, div, dens = _routes(field, z)
    np.testing.assert_allclose(div, dense, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dens, dense, rtol=1e-6, atol=1e-6)


def test_routes_agree_on_other_paths_and_neighbours():
    rng = np.random.default_rng(7)
    lower = rng.uniform(-1, 0.5, (2, 3))
    law = jf.GaussianNeighbours(np.array([0.3, 0.7]), lower, lower + 0.4, np.array([0.1, 0.2]))
    # rectified flow is covered on mixtures above
    for path in (jf.Cosine(), jf.OrnsteinUhlenbeck(4.0)):
        field = jf.AnalyticField(law, path)
        z = jnp.asarray(rng.standard_normal(3))
        dense, div, dens = _routes(field, z)
        np.testing.assert_allclose(div, dense, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(dens, dense, rtol=1e-6, atol=1e-6)


def test_hutchinson_is_unbiased():
    rng = np.random.default_rng(8)
    law = make_mixture(rng, 4, 2, "full")
    field = jf.AnalyticField(law, jf.RectifiedFlow())
    z = jnp.asarray(rng.standard_normal(4))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    exact, est = (np.asarray(a) for a in _exact_and_hutchinson(field, z, keys))
    stderr = float(np.std(est)) / np.sqrt(len(keys))
    assert abs(float(np.mean(est)) - float(exact)) < 4 * stderr + 1e-4
    assert float(np.std(est)) > 0  # a real estimator, not the exact trace


@eqx.filter_jit
def _exact_and_hutchinson(field, z, keys):
    exact = jf.log_det_generation(field, z, route="divergence", **SOLVE)
    est = jax.vmap(lambda k: jf.log_det_generation(field, z, key=k, rtol=1e-6, atol=1e-6))(keys)
    return exact, est


@eqx.filter_jit
def _both_divergences(field, x, t):
    return field.divergence(x, t, method="closed_form"), field.divergence(x, t, method="trace")


@settings(max_examples=6, deadline=None)
@given(
    n=st.integers(1, 6),
    k=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(["full", "diag", "iso"]),
    frac=st.floats(0.0, 1.0),
    path=st.sampled_from(["rf", "cosine", "ou"]),
)
def test_closed_form_divergence_equals_trace(n, k, seed, kind, frac, path):
    rng = np.random.default_rng(seed)
    p = {"rf": jf.RectifiedFlow(), "cosine": jf.Cosine(), "ou": jf.OrnsteinUhlenbeck(3.0)}[path]
    field = jf.AnalyticField(make_mixture(rng, n, k, kind), p)
    x = jnp.asarray(rng.standard_normal(n))
    t = frac * p.t_noise
    closed, trace = _both_divergences(field, x, t)
    np.testing.assert_allclose(closed, trace, rtol=1e-9, atol=1e-9)


@eqx.filter_jit
def _trace_and_closed_form(field, z):
    return (
        jf.log_det_generation(field, z, divergence="trace", **SOLVE),
        jf.log_det_generation(field, z, divergence="closed_form", **SOLVE),
    )


def test_divergence_route_with_trace_on_neighbours_and_method_errors():
    rng = np.random.default_rng(9)
    law = make_mixture(rng, 3, 2, "full")
    field = jf.AnalyticField(law, jf.RectifiedFlow())
    z = jnp.asarray(rng.standard_normal(3))
    a, b = _trace_and_closed_form(field, z)
    np.testing.assert_allclose(a, b, rtol=1e-9)
    emp = jf.AnalyticField(jf.Empirical(jnp.ones((2, 3))), jf.RectifiedFlow())
    with pytest.raises(ValueError, match="closed-form"):
        emp.divergence(z, 0.5, method="closed_form")
    with pytest.raises(ValueError, match="needs a PRNG key"):
        jf.log_det_generation(field, z, divergence="hutchinson")


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), path=st.sampled_from(["rf", "cos"]))
def test_invert_with_log_det_is_minus_the_generation_log_det(seed, path):
    """log|det J_{G^{-1}}(x)| = -log|det J_G(G^{-1}(x))|, and the inversion's point.
    One n, so the drawn laws share a compilation per path."""
    n = 3
    rng = np.random.default_rng(seed)
    field = jf.AnalyticField(
        make_mixture(rng, n, 2, "full"), jf.RectifiedFlow() if path == "rf" else jf.Cosine()
    )
    x = jnp.asarray(rng.uniform(-2, 2, n))
    z, log_det_inverse, z_ref, dense, density = _invert_with_log_det(field, x)
    np.testing.assert_allclose(z, z_ref, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(log_det_inverse, dense, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(-log_det_inverse, density, rtol=1e-6, atol=1e-6)


@eqx.filter_jit
def _invert_with_log_det(field, x):
    """The inversion with its log-determinant and the independent routes, in one
    program per path."""
    z, log_det_inverse = jf.invert_with_log_det(field, x, **SOLVE)
    z_ref = jf.invert(field, x, **SOLVE)
    dense = jf.log_abs_det_jacobian(lambda y: jf.invert(field, y, **SOLVE), x)
    density = field.law.marginal_log_prob(z, 0.0, 1.0) - field.law.log_prob(x)
    return z, log_det_inverse, z_ref, dense, density


def test_jacfwd_of_an_adaptive_solve_is_not_error_controlled():
    """README's note: near paper 000's Fig. 3 ridge, `jax.jacfwd` of an adaptive
    `generate` differentiates the step-size choices (off by 14% at the default
    rtol), while `generate_with_jacobian` puts `J` under error control (3.4e-8);
    the reference is the variational equation solved at rtol = atol = 1e-12."""
    field = jf.AnalyticField(jf.data.fig3_mixture(jnp.float64), jf.RectifiedFlow())
    z = jnp.array([0.0, 0.6])
    through_solver, x, (x_controlled, controlled), tight = (
        jax.tree_util.tree_map(np.asarray, out) for out in _three_jacobians(field, z)
    )
    assert float(np.linalg.norm(tight)) > 1e4  # on the ridge: strongly expanding

    def rel(a):
        return float(np.linalg.norm(a - tight) / np.linalg.norm(tight))

    assert rel(controlled) < 1e-6
    assert rel(through_solver) > 1e-2
    # the same solve's G agrees: only the derivative of the step choices is off
    np.testing.assert_allclose(x, x_controlled, rtol=1e-7)


@eqx.filter_jit
def _three_jacobians(field, z):
    """One program: jacfwd through the adaptive solve, with the solve's G; the
    variational equation at the default and at a tight tolerance."""
    return (
        jax.jacfwd(lambda z: jf.generate(field, z))(z),
        jf.generate(field, z),
        jf.generate_with_jacobian(field, z),
        jf.generate_with_jacobian(field, z, rtol=1e-12, atol=1e-12)[1],
    )
