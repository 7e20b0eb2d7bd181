"""Matrix-free singular values (`jaxflow/_matrix_free/_svd.py`) against the dense
SVD of `jax.jacfwd`, the Gaussian closed form `J_G = S^(1/2)` and the inverse
map's route to the smallest values; float32, `jit`, argument checks and an
honest convergence flag."""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import LAWS, PATHS, seeds
from hypothesis import given, settings
from jaxtyping import TypeCheckError

import jaxflow as jf
from jaxflow._matrix_free._svd import (
    _block_lanczos,
    _uncertified_message,
    smallest_singular_values,
    top_singular_values,
)

# a fixed-step solve: its products are the exact derivatives of the discrete map,
# which the dense Jacobian of the same map also differentiates
SOLVE = dict(solver="heun", steps=8)
TOP = eqx.filter_jit(top_singular_values)
JACOBIAN = eqx.filter_jit(lambda fn, x: jax.jacfwd(fn)(x))


def check_against_dense(r, jac, k, rtol):
    u, s, vt = (np.asarray(a) for a in jnp.linalg.svd(jac))
    got = np.asarray(r.values)
    assert r.values.shape == (k,) and r.left.shape == r.right.shape == (jac.shape[0], k)
    assert np.all(np.diff(got) <= 0)
    np.testing.assert_allclose(got, s[:k], rtol=rtol)
    # vectors up to sign, where the gap to the neighbours allows
    for i in range(k):
        gap = min(abs(s[i] - s[j]) for j in range(len(s)) if j != i) / s[0]
        if gap > 1e-3:
            assert abs(np.dot(r.left[:, i], u[:, i])) > 1 - 1e-6
            assert abs(np.dot(r.right[:, i], vt[i])) > 1 - 1e-6
    # the reported residuals bound the true ones
    actual = np.maximum(
        np.linalg.norm(jac @ r.right - r.left * got, axis=0),
        np.linalg.norm(jac.T @ r.left - r.right * got, axis=0),
    )
    assert np.all(actual <= np.asarray(r.residuals) + 1e-12 * s[0])
    assert bool(np.all(r.converged))


def _plain(a, c, x):
    return jnp.tanh(a @ x) + c * x**2


@pytest.mark.parametrize("n, k", [(6, 1), (40, 4)])
@settings(max_examples=3, deadline=None)
@given(seed=seeds())
def test_plain_map_matches_the_dense_svd(n, k, seed):
    rng = np.random.default_rng(seed)
    # a pytree map: its arrays are traced, so the examples share one compilation
    fn = jax.tree_util.Partial(
        _plain, jnp.asarray(rng.standard_normal((n, n))), jnp.asarray(rng.standard_normal(n))
    )
    x = jnp.asarray(rng.standard_normal(n))
    r = TOP(fn, x, k, key=jax.random.PRNGKey(seed))
    check_against_dense(r, JACOBIAN(fn, x), k, 1e-10)


@pytest.mark.parametrize(
    "law, path", [("mixture_full", "rectified_flow"), ("mixture_diag", "cosine")]
)
@settings(max_examples=2, deadline=None)
@given(seed=seeds())
def test_generation_map_matches_the_dense_svd(law, path, seed):
    n, k = 20, 3
    rng = np.random.default_rng(seed)
    field = jf.AnalyticField(LAWS[law](rng, n), PATHS[path])
    g = jf.generation_map(field, **SOLVE)
    z = jnp.asarray(rng.standard_normal(n))
    # block 8: three steps fill R^20, so the values are exact to round-off
    r = TOP(g, z, k, key=jax.random.key(seed), block_size=8)
    check_against_dense(r, JACOBIAN(g, z), k, 1e-6)
    assert int(r.iterations) <= 3


def test_gaussian_closed_form_at_n_1000():
    """Rectified flow carries N(0, I) to N(m, S) by G(z) = m + S^(1/2) z, so the
    singular values of J_G are the square roots of S's eigenvalues."""
    n, k = 1000, 6
    rng = np.random.default_rng(0)
    # a diagonal covariance, its largest variances at random coordinates
    lam = np.concatenate([[9.0, 6.0, 4.0, 3.0, 2.5, 2.0], rng.uniform(0.2, 1.0, n - 6)])
    perm = rng.permutation(n)
    field = jf.AnalyticField(jf.Gaussian(rng.uniform(-1, 1, n), lam[perm]), jf.RectifiedFlow())
    g = jf.generation_map(field, solver="tsit5", steps=16)
    z = jnp.asarray(rng.standard_normal(n))
    r = TOP(g, z, k, key=jax.random.PRNGKey(1))
    np.testing.assert_allclose(r.values, np.sqrt(lam[:k]), rtol=1e-6)
    assert bool(np.all(r.converged))
    # the singular vectors are S's eigenvectors, the coordinate axes, up to sign
    axes = np.argsort(perm)[:k]
    np.testing.assert_allclose(np.abs(r.right[axes, np.arange(k)]), 1, atol=1e-6)
    np.testing.assert_allclose(np.abs(r.left[axes, np.arange(k)]), 1, atol=1e-6)


def test_smallest_values_via_the_inverse_map():
    n, k = 12, 3
    rng = np.random.default_rng(3)
    field = jf.AnalyticField(LAWS["mixture_full"](rng, n), jf.RectifiedFlow())
    solve = dict(solver="dopri5", rtol=1e-11, atol=1e-11)
    g = jf.generation_map(field, **solve)
    z = jnp.asarray(rng.standard_normal(n))
    r = eqx.filter_jit(smallest_singular_values)(g, z, k, key=jax.random.PRNGKey(0))
    jac = JACOBIAN(g, z)
    u, s, vt = np.linalg.svd(np.asarray(jac))
    assert np.all(np.diff(np.asarray(r.values)) >= 0)
    np.testing.assert_allclose(r.values, s[::-1][:k], rtol=1e-6)
    assert bool(np.all(r.converged))
    # J_G v = s u for the returned pairs, to the inverse solve's accuracy
    np.testing.assert_allclose(jac @ r.right, r.left * r.values, atol=1e-6 * s[-1])
    # the certificate: |J_G v_i| = s_i and the Jacobian round trip, to the solves'
    # accuracy (about 1e-10 here), within tol = 1e-8
    assert float(np.max(r.forward_errors)) < 1e-8 and float(r.round_trip_error) < 1e-8
    jv = np.linalg.norm(np.asarray(jac) @ np.asarray(r.right), axis=0)
    np.testing.assert_allclose(r.forward_errors, np.abs(jv / r.values - 1), atol=1e-12)


def test_smallest_values_of_a_plain_map_with_its_inverse():
    n, k = 30, 4
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = jnp.asarray((q * np.geomspace(1e-6, 1.0, n)) @ q.T)
    a_inv = jnp.linalg.inv(a)

    def fn(x):
        return a @ jnp.sinh(x)

    def inverse(y):
        return jnp.arcsinh(a_inv @ y)

    x = jnp.asarray(rng.uniform(-0.5, 0.5, n))
    r, jac = jax.jit(
        lambda x: (
            smallest_singular_values(fn, x, k, key=jax.random.PRNGKey(0), inverse=inverse),
            jax.jacfwd(fn)(x),
        )
    )(x)
    s = np.linalg.svd(np.asarray(jac), compute_uv=False)
    # the dense SVD of J itself only holds these to ~eps * s_1 / s_n ~ 1e-10
    np.testing.assert_allclose(r.values, s[::-1][:k], rtol=1e-6)
    assert float(r.values[0]) < 1e-5
    # an exact inverse passes the certificate, at cond(J) = 1e6 (round-off allowed)
    assert bool(np.all(r.converged))


def test_float32():
    n, k = 40, 4
    rng = np.random.default_rng(5)
    a = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)

    def fn(x):
        return jnp.tanh(a @ x) + 0.5 * x

    x = jnp.asarray(rng.standard_normal(n), jnp.float32)
    r = TOP(fn, x, k, key=jax.random.PRNGKey(0))
    assert r.values.dtype == r.left.dtype == jnp.float32
    s = np.linalg.svd(np.asarray(JACOBIAN(fn, x), np.float64), compute_uv=False)
    np.testing.assert_allclose(r.values, s[:k], rtol=1e-4)
    assert bool(np.all(r.converged))
    assert float(np.max(r.residuals)) <= 1e-4 * s[0]


def test_convergence_flag_is_honest():
    """A slowly decaying spectrum: two steps of block 3 cannot resolve the top
    values, and the flag and the residuals say so."""
    n, k = 200, 3
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = 1.0 - 0.002 * np.arange(n)
    a = jnp.asarray((q * s) @ q.T)
    x = jnp.zeros(n)

    def fn(x):
        return a @ x

    r = TOP(fn, x, k, key=jax.random.PRNGKey(0), max_iterations=2, block_size=k)
    assert int(r.iterations) == 2
    assert not bool(np.all(r.converged))
    actual = np.maximum(
        np.linalg.norm(a @ r.right - r.left * r.values, axis=0),
        np.linalg.norm(a.T @ r.left - r.right * r.values, axis=0),
    )
    assert np.all(actual <= np.asarray(r.residuals) * (1 + 1e-8))
    assert np.all(np.asarray(r.converged) == (np.asarray(r.residuals) <= 1e-8 * float(r.values[0])))
    # with room, the same problem converges
    r = TOP(fn, x, k, key=jax.random.PRNGKey(0), max_iterations=60, block_size=12)
    assert bool(np.all(r.converged))
    np.testing.assert_allclose(r.values, s[:k], rtol=1e-8)


def test_a_non_transposed_vjp_does_not_converge():
    """The residuals read the JVP and VJP sides of B separately: products whose
    VJP is not the transpose of their JVP are reported, not hidden."""
    n, b = 8, 4
    a = jnp.asarray(np.random.default_rng(8).standard_normal((n, n)))

    @jax.jit
    def both(a):
        return [
            _block_lanczos(lambda v: a @ v, vjp, n, a.dtype, 2, b, 2, 1e-8, jax.random.key(0))
            for vjp in (lambda u: 1.01 * (a.T @ u), lambda u: a.T @ u)
        ]

    r, r_transposed = both(a)
    assert not bool(np.any(r.converged))
    assert float(np.min(r.residuals)) > 1e-4 * float(r.values[0])
    assert bool(np.all(r_transposed.converged))


def _fn(x):
    return jnp.tanh(x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), "k must be an int in \\[1, n = 5\\]"),
        (dict(k=6), "k must be an int in \\[1, n = 5\\]"),
        (dict(key=jnp.zeros(4, jnp.uint32)), "key must be one PRNG key"),
        (dict(tol=0.0), "tol must be a finite real number > 0"),
        (dict(tol=-1.0), "tol must be a finite real number > 0"),
        (dict(tol=float("nan")), "tol must be a finite real number > 0"),
        (dict(max_iterations=0), "max_iterations must be a positive int"),
        (dict(block_size=0), "block_size must be a positive int"),
        (dict(block_size=1, k=2), "block_size must be >= k = 2"),
        (dict(x=jnp.array([1.0, jnp.nan, 0, 0, 0])), "NaN"),
        (dict(fn=lambda x: x[:3]), "same shape"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(fn=_fn, x=jnp.ones(5), k=2, key=jax.random.PRNGKey(0)) | kwargs
    fn, x, k = args.pop("fn"), args.pop("x"), args.pop("k")
    with pytest.raises(ValueError, match=match):
        top_singular_values(fn, x, k, **args)


# wrong types: a ValueError, or first the test suite's jaxtyping hook's error
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(k=2.0),
        dict(key=0),
        dict(key=jnp.zeros(2)),
        dict(key=jax.random.split(jax.random.PRNGKey(0), 2)),
        dict(x=jnp.ones((2, 5))),
        dict(fn=3),
    ],
)
def test_arguments_of_the_wrong_type(kwargs):
    args = dict(fn=_fn, x=jnp.ones(5), k=2, key=jax.random.PRNGKey(0)) | kwargs
    fn, x, k = args.pop("fn"), args.pop("x"), args.pop("k")
    with pytest.raises((ValueError, TypeCheckError)):
        top_singular_values(fn, x, k, **args)


def test_bad_arguments_of_the_smallest():
    field = jf.AnalyticField(LAWS["gaussian"](np.random.default_rng(0), 3), jf.RectifiedFlow())
    g = jf.generation_map(field, **SOLVE)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="builds its own inverse"):
        smallest_singular_values(g, jnp.ones(3), 1, key=key, inverse=_fn)
    with pytest.raises(ValueError, match="pass the inverse map as inverse="):
        smallest_singular_values(_fn, jnp.ones(3), 1, key=key)
    with pytest.raises(ValueError, match="k must be an int"):
        smallest_singular_values(g, jnp.ones(3), 4, key=key)


# ---- the certificate of the smallest values against the forward map (issue 26) ----

_A3 = np.random.default_rng(0).standard_normal((3, 3))
_J_SINGULAR = np.diag([1.0, 2.0, 0.0])


def _linear_a3(x):
    return jnp.asarray(_A3) @ x


def _twice(y):
    return 2 * y


def _linear_singular(x):
    return jnp.asarray(_J_SINGULAR) @ x


def _pinv_singular(y):
    return jnp.asarray(np.linalg.pinv(_J_SINGULAR)) @ y


@pytest.mark.parametrize(
    "fn, inverse, truth, forward_error",
    [
        # J_inverse = 2 I: values 0.5 where s_3(A) = 0.33; |A v| is not 0.5
        (_linear_a3, _twice, np.linalg.svd(_A3, compute_uv=False)[-1], 1.0),
        # the pseudo-inverse of diag(1, 2, 0): value 1 where s_3 = 0; |J v| = 1 holds
        # along e_1, and only the round trip (J^+ J = diag(1, 1, 0)) catches it
        (_linear_singular, _pinv_singular, 0.0, None),
    ],
    ids=["scaled", "pinv"],
)
def test_an_inexact_inverse_fails_the_certificate(fn, inverse, truth, forward_error):
    """Issue 26: the inverse route trusted `inverse=`. Eagerly, a warning names the
    cause and the mismatch; under jit, `converged` and the error fields say it."""
    x, key = jnp.ones(3), jax.random.PRNGKey(0)
    with pytest.warns(RuntimeWarning, match="round trip.*inexact inverse") as record:
        r = smallest_singular_values(fn, x, 1, key=key, inverse=inverse)
    assert f"{float(r.round_trip_error):.2e}" in str(record[0].message)
    assert abs(float(r.values[0]) - truth) > 0.1  # the inverse's value, kept
    assert not bool(np.any(r.converged))
    assert float(r.round_trip_error) > 0.1
    if forward_error is not None:
        assert float(r.forward_errors[0]) > forward_error
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # under jit: no warning, the fields carry it
        rj = eqx.filter_jit(smallest_singular_values)(fn, x, 1, key=key, inverse=inverse)
    assert not bool(np.any(rj.converged))
    np.testing.assert_allclose(rj.round_trip_error, r.round_trip_error, rtol=1e-12)


@eqx.filter_jit
def _smallest_and_jacobian(g, z):
    return smallest_singular_values(g, z, 1, key=jax.random.PRNGKey(0)), jax.jacfwd(g)(z)


def test_euler_inversion_of_euler_generation_fails_the_certificate():
    """Issue 26: Euler inversion does not invert Euler generation. At 20 steps the
    inverse route's smallest value is 16% above the dense SVD's of the same map for a
    2-D Gaussian (18% for the issue's 2-D mixture, whose solves compile slower), and
    both checks see it (under jit: in the fields, with no warning)."""
    rng = np.random.default_rng(0)
    field = jf.AnalyticField(LAWS["gaussian"](rng, 2), jf.RectifiedFlow())
    z = jnp.asarray(rng.standard_normal(2))
    r, jac = _smallest_and_jacobian(jf.generation_map(field, solver="euler", steps=20), z)
    jac = np.asarray(jac)
    s = np.linalg.svd(jac, compute_uv=False)
    assert float(r.values[0]) / s[-1] - 1 > 0.1
    assert not bool(r.converged[0])
    # |J_G v| against the value: the JVP of the same map, measured by the dense J
    jv = np.linalg.norm(jac @ np.asarray(r.right[:, 0]))
    np.testing.assert_allclose(r.forward_errors[0], abs(jv / float(r.values[0]) - 1), rtol=1e-6)
    assert float(r.forward_errors[0]) > 0.1 and float(r.round_trip_error) > 0.1
    # outside jit, the message names the likely cause and the measured mismatch
    message = _uncertified_message(r, 1e-8)
    assert "fixed-step solver" in message and f"{float(r.forward_errors[0]):.2e}" in message


def test_top_singular_values_carry_no_certificate():
    r = TOP(_fn, jnp.ones(3) * 0.3, 1, key=jax.random.PRNGKey(0))
    assert r.forward_errors is None and r.round_trip_error is None


def _nan_map(x):
    return x / 0 * 0


def _sqrt_map(x):  # finite at 0, its derivative is not
    return jnp.sqrt(jnp.abs(x))


@pytest.mark.parametrize(
    "fn, match",
    [
        (_nan_map, "fn \\(_nan_map\\) returned NaN or inf"),
        (_sqrt_map, "Jacobian products of fn \\(_sqrt_map\\) are NaN or inf"),
    ],
)
def test_a_non_finite_map_is_an_error_not_a_value(fn, match):
    """Issue 26: `top_singular_values` of a NaN map returned values `[nan]`."""
    x, key = jnp.zeros(3), jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match=match):
        top_singular_values(fn, x, 1, key=key)
    # under jit: eqx.error_if on the products (NaN from the map makes them NaN)
    with pytest.raises(Exception, match=f"products of fn \\({fn.__name__}\\) are NaN"):
        TOP(fn, x, 1, key=key)


def test_a_non_finite_inverse_is_an_error_naming_it():
    x, key = jnp.zeros(3), jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="inverse \\(_nan_map\\) returned NaN"):
        smallest_singular_values(_fn, x, 1, key=key, inverse=_nan_map)
    with pytest.raises(ValueError, match="fn \\(_nan_map\\) returned NaN"):
        smallest_singular_values(_nan_map, x, 1, key=key, inverse=_fn)
