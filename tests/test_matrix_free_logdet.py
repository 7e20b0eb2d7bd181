"""Matrix-free log-determinants (issue 15): the trace estimators
(`jaxflow/_matrix_free/_trace.py`), `log |det J_G|` with a standard error from
divergences estimated along the trajectory (`log_det_estimate`), `Ebar` from it,
and stochastic Lanczos quadrature (`jaxflow/_matrix_free/_slq.py`), each against
an independent exact route: the trace of the dense matrix, the closed-form
divergence, the closed-form densities (paper 000 Lemma D.1) and `slogdet` of the
dense Jacobian."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from helpers import make_mixture

import jaxflow as jf
from jaxflow._logdet import geometric_mean_from_log_det, log_det_estimate
from jaxflow._matrix_free._operator import generation_map
from jaxflow._matrix_free._slq import log_det_slq
from jaxflow._matrix_free._trace import Estimate, trace_estimate

KEY = jax.random.PRNGKey(0)


def _estimates(matvec, n, num_matvecs, method, keys, dtype=None):
    fn = jax.jit(
        jax.vmap(
            lambda k: trace_estimate(
                matvec, n, key=k, num_matvecs=num_matvecs, method=method, dtype=dtype
            )
        )
    )
    return fn(keys)


def _assert_unbiased_and_honest(est, exact):
    """The mean over keys within 3 standard errors of `exact`, and the reported
    stderr honest: `|z| = |value - exact| / stderr` has the median and the
    two-sigma coverage of a normal (0.67, 0.95) up to the heavier tails of a
    Student t with few probes and the spread over keys."""
    values = np.asarray(est.value)
    se_of_mean = values.std(ddof=1) / np.sqrt(len(values))
    assert abs(values.mean() - exact) < 3 * se_of_mean, (values.mean(), exact, se_of_mean)
    assert values.std() > 0  # a real estimator, not the exact trace
    z = np.abs(values - exact) / np.asarray(est.stderr)
    assert 0.45 < np.median(z) < 1.0, np.median(z)
    assert 0.8 < np.mean(z < 2) < 0.99, np.mean(z < 2)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_estimators_are_unbiased_with_honest_stderr(method):
    rng = np.random.default_rng(0)
    n = 40
    a = jnp.asarray(rng.standard_normal((n, n)))  # non-symmetric, flat spectrum
    est = _estimates(lambda v: a @ v, n, 30, method, jax.random.split(KEY, 2000))
    _assert_unbiased_and_honest(est, float(jnp.trace(a)))


def test_trace_estimators_on_the_divergence_of_a_mixture_field():
    rng = np.random.default_rng(1)
    n = 30
    field = jf.AnalyticField(make_mixture(rng, n, 3, "full"), jf.RectifiedFlow())
    x, t = jnp.asarray(rng.standard_normal(n)), 0.4
    exact = float(eqx.filter_jit(lambda f, x: f.divergence(x, t, method="closed_form"))(field, x))

    def jvp(v):
        return jax.jvp(lambda y: field.velocity_unchecked(y, t), (x,), (v,))[1]

    keys = jax.random.split(KEY, 1000)
    for method in ("hutchinson", "hutch++"):
        _assert_unbiased_and_honest(_estimates(jvp, n, 24, method, keys), exact)


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum():
    rng = np.random.default_rng(2)
    n = 100
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = jnp.asarray((q * 0.75 ** np.arange(n)) @ q.T)
    keys = jax.random.split(KEY, 400)
    var = {
        method: float(jnp.var(_estimates(lambda v: a @ v, n, 30, method, keys).value))
        for method in ("hutchinson", "hutch++")
    }
    assert var["hutch++"] < 0.2 * var["hutchinson"], var
    # a sketch spanning the space makes it exact, up to the directions below
    # round-off that the sketch's orthonormalisation leaves to the residual
    full = jax.jit(lambda a: trace_estimate(lambda v: a @ v, n, key=KEY, num_matvecs=3 * n))(a)
    np.testing.assert_allclose(full.value, jnp.trace(a), rtol=1e-6)
    assert float(full.stderr) < 1e-6


def test_trace_estimate_float32():
    # the same key draws the same probes: float32 is float64 to its rounding
    a = jnp.asarray(np.random.default_rng(6).standard_normal((8, 8)))

    @jax.jit
    def both(key):
        return [
            trace_estimate(lambda v: a @ v, 8, key=key, num_matvecs=7, method=m, dtype=d)
            for m in ("hutchinson", "hutch++")
            for d in (jnp.float32, jnp.float64)
        ]

    est = both(KEY)
    for e32, e64 in (est[:2], est[2:]):
        assert e32.value.dtype == jnp.float32 and e32.stderr.dtype == jnp.float32
        np.testing.assert_allclose(e32.value, e64.value, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(e32.stderr, e64.stderr, rtol=1e-4, atol=1e-5)


def _diag_mixture_field(n, spread):
    """A diagonal-covariance mixture whose components overlap (means `spread / sqrt
    n` apart per coordinate), so that the posterior weights move along the path and
    the velocity's Jacobian is diagonal plus a low-rank part."""
    rng = np.random.default_rng(3)
    means = rng.standard_normal((3, n)) * (spread / np.sqrt(n))
    law = jf.GaussianMixture(np.array([0.3, 0.3, 0.4]), means, rng.uniform(0.05, 0.5, (3, n)))
    return jf.AnalyticField(law, jf.RectifiedFlow()), jnp.asarray(rng.standard_normal(n))


FIXED = dict(solver="tsit5", steps=24)


@eqx.filter_jit
def _large_n_routes(field, z, key):
    density = jf.log_det_generation(field, z, route="density", **FIXED)
    hutch = log_det_estimate(field, z, key=key, probes=8, method="hutchinson", **FIXED)
    hutchpp = log_det_estimate(field, z, key=key, probes=8, method="hutch++", **FIXED)
    return density, hutch, hutchpp


def test_log_det_estimate_at_n_4096_agrees_with_the_densities():
    n = 4096
    field, z = _diag_mixture_field(n, 1.5)
    density, hutch, hutchpp = _large_n_routes(field, z, KEY)
    for est in (hutch, hutchpp):
        assert 0 < float(est.stderr) < 1e-2 * abs(float(density))
        assert abs(float(est.value - density)) < 3 * float(est.stderr), (est, density)
    ebar = geometric_mean_from_log_det(hutchpp, n)
    np.testing.assert_allclose(ebar.value, jnp.exp(density / n), rtol=1e-3)
    np.testing.assert_allclose(ebar.stderr, ebar.value * hutchpp.stderr / n, rtol=1e-12)


CHEAP = dict(solver="heun", steps=12)


@eqx.filter_jit
def _closed_form_log_det(field, z):
    return jf.log_det_generation(field, z, divergence="closed_form", **CHEAP)


@eqx.filter_jit
def _estimates_along_the_solve(field, z, keys, method, inverse):
    return jax.vmap(
        lambda k: log_det_estimate(
            field, z, key=k, probes=6, method=method, inverse=inverse, **CHEAP
        )
    )(keys)


@eqx.filter_jit
def _inversion_with_closed_form(field, z):
    x = jf.generate(field, z, **CHEAP)
    return x, jf.invert_with_log_det(field, x, divergence="closed_form", **CHEAP)[1]


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_log_det_estimate_is_unbiased_for_the_solve_with_honest_stderr(method):
    # against the closed-form divergence integrated by the same fixed-step solve:
    # the difference is the estimator's alone
    field, z = _diag_mixture_field(64, 3.0)
    exact = float(_closed_form_log_det(field, z))
    est = _estimates_along_the_solve(field, z, jax.random.split(KEY, 100), method, False)
    _assert_unbiased_and_honest(est, exact)


def test_log_det_estimate_along_the_inversion_is_unbiased_for_that_solve():
    # inverse=True: log|det J_{G^-1}(x)| along the inversion, against the
    # closed-form divergence integrated by the same fixed-step inversion
    field, z = _diag_mixture_field(64, 3.0)
    x, exact = _inversion_with_closed_form(field, z)
    est = _estimates_along_the_solve(field, x, jax.random.split(KEY, 100), "hutch++", True)
    _assert_unbiased_and_honest(est, float(exact))
    # the inverse map's log-determinant: minus the generation's, to the solves' error
    forward = float(_closed_form_log_det(field, z))
    assert abs(float(exact) + forward) < 0.05 * abs(forward), (exact, forward)


@eqx.filter_jit
def _float32_and_outcome(field, z):
    cheap = dict(solver="euler", steps=8)
    exact = jf.log_det_generation(field, z, **cheap)
    est = log_det_estimate(field, z.astype(jnp.float32), key=KEY, probes=16, **cheap)
    zs = jnp.stack([z, z.at[0].set(jnp.nan)])
    out = jax.vmap(lambda y: log_det_estimate(field, y, key=KEY, probes=4, throw=False, **cheap))(
        zs
    )
    return exact, est, out


def test_log_det_estimate_float32_and_outcome():
    field, z = _diag_mixture_field(16, 3.0)
    exact, est, out = _float32_and_outcome(field, z)
    assert est.value.dtype == jnp.float32
    assert abs(float(est.value) - float(exact)) < 4 * float(est.stderr) + 1e-3
    # throw=False: an Outcome holding the Estimate, NaN where the point failed
    assert isinstance(out.value, Estimate)
    np.testing.assert_array_equal(out.ok, [True, False])
    assert np.isfinite(out.value.value[0]) and np.isnan(out.value.value[1])


def test_slq_matches_slogdet_of_a_generation_map():
    n = 40
    rng = np.random.default_rng(4)
    field = jf.AnalyticField(make_mixture(rng, n, 3, "diag"), jf.RectifiedFlow())
    g = generation_map(field, solver="euler", steps=6)
    z = jnp.asarray(rng.standard_normal(n))
    exact, est = eqx.filter_jit(
        lambda g, z: (
            jnp.linalg.slogdet(jax.jacfwd(g)(z))[1],
            log_det_slq(g, z, key=KEY, probes=32, depth=24),
        )
    )(g, z)
    exact = float(exact)
    assert abs(float(est.value) - exact) < 3 * float(est.stderr) + 1e-6, (est, exact)
    assert abs(float(est.value) - exact) < 0.03 * abs(exact)


def _plain_map(n, rng):
    a = jnp.asarray(rng.standard_normal((n, n)) / np.sqrt(n))
    d = jnp.asarray(np.exp(rng.uniform(-1.5, 1.0, n)))
    return lambda x: d * x + 0.3 * jnp.tanh(a @ x)


@jax.jit
def _slq_plain(x, keys):
    fn = _plain_map(x.shape[0], np.random.default_rng(5))
    n = x.shape[0]
    many = jax.vmap(lambda k: log_det_slq(fn, x, key=k, probes=8, depth=n))(keys)
    one = log_det_slq(fn, x, key=KEY, probes=64, depth=12)
    one32 = log_det_slq(fn, x.astype(jnp.float32), key=KEY, probes=64, depth=n)
    dense = jnp.linalg.slogdet(jax.jacfwd(fn)(x))[1]
    return many, one, one32, dense, jf.geometric_mean_singular_value(fn, x)


# This program (a vmap of 200 SLQ runs beside two more in one jit) deadlocked
# XLA:CPU on 2 cores when its eigendecompositions were batched; jaxflow._linalg
# decomposes one matrix at a time (tests/test_linalg.py checks the lowering).
def test_slq_matches_slogdet_of_a_plain_map_and_its_stderr_is_honest():
    n = 32
    x = jnp.asarray(np.random.default_rng(6).standard_normal(n))
    many, one, one32, exact, ebar_dense = _slq_plain(x, jax.random.split(KEY, 200))
    exact = float(exact)
    # depth = n: the quadrature is exact, the error is the probes' alone
    _assert_unbiased_and_honest(many, exact)
    assert abs(float(one.value) - exact) < 3 * float(one.stderr)
    assert abs(float(one.value) - exact) < 0.03 * abs(exact)
    # Ebar against the dense geometric mean of the singular values
    ebar = geometric_mean_from_log_det(one, n)
    assert abs(float(ebar.value - ebar_dense)) < 3 * float(ebar.stderr)
    # float32, with an exact quadrature (depth = n) of a well-conditioned J^T J
    assert one32.value.dtype == jnp.float32
    assert abs(float(one32.value) - exact) < 3 * float(one32.stderr)


def test_slq_invariant_subspace_and_identity():
    # J = 2 I: one Lanczos step finds the invariant subspace; the padded steps
    # must not bias the quadrature
    n = 20
    est = jax.jit(lambda x: log_det_slq(lambda x: 2.0 * x, x, key=KEY, probes=4, depth=10))(
        jnp.ones(n)
    )
    np.testing.assert_allclose(est.value, n * np.log(2.0), rtol=1e-12)
    assert float(est.stderr) < 1e-10


@pytest.fixture
def plain():
    """The test run's jaxtyping checks refuse some of these inputs first, with a
    `TypeError`; without them, as users run, the `ValueError` is what they see
    (as in tests/test_input_checks.py)."""
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", before)


def test_bad_arguments(plain):
    mv = lambda v: 2.0 * v  # noqa: E731
    field, z = _diag_mixture_field(4, 1.0)
    bad = [
        (lambda: trace_estimate(mv, 0, key=KEY, num_matvecs=8), "n must"),
        (lambda: trace_estimate(mv, 4, key=KEY, num_matvecs=3), "num_matvecs >= 4"),
        (lambda: trace_estimate(mv, 4, key=KEY, num_matvecs=1, method="hutchinson"), ">= 2"),
        (lambda: trace_estimate(mv, 4, key=KEY, num_matvecs=8, method="lanczos"), "method"),
        (lambda: trace_estimate(mv, 4, key=KEY, num_matvecs=8, dtype=jnp.int32), "dtype"),
        (lambda: trace_estimate(mv, 4, key=0, num_matvecs=8), "PRNG key"),
        (lambda: trace_estimate(3.0, 4, key=KEY, num_matvecs=8), "matvec"),
        (lambda: trace_estimate(lambda v: v[:2], 4, key=KEY, num_matvecs=8), "shape"),
        (lambda: log_det_estimate(field, z, key=KEY, probes=1), "probes"),
        (lambda: log_det_estimate(field, z, key=KEY, probes=2.5), "probes"),
        (lambda: log_det_estimate(field, z, key=KEY, sketch=0), "sketch"),
        (lambda: log_det_estimate(field, z, key=KEY, sketch=2, method="hutchinson"), "sketch"),
        (lambda: log_det_estimate(field, z, key=KEY, method="trace"), "method"),
        (lambda: log_det_estimate(field, z, key=KEY, inverse=1), "inverse"),
        (lambda: log_det_estimate(field, z, key=None), "PRNG key"),
        (lambda: log_det_estimate(field, jnp.zeros(3), key=KEY), "length"),
        (lambda: log_det_estimate(mv, z, key=KEY), "field"),
        (lambda: log_det_slq(mv, z, key=KEY, probes=1), "probes"),
        (lambda: log_det_slq(mv, z, key=KEY, depth=0), "depth"),
        (lambda: log_det_slq(mv, z, key=0), "PRNG key"),
        (lambda: log_det_slq(lambda x: x[:2], z, key=KEY), "same shape"),
        (lambda: log_det_slq(mv, jnp.zeros((2, 2)), key=KEY), "one point"),
        (lambda: geometric_mean_from_log_det(1.0, 4), "Estimate"),
        (lambda: geometric_mean_from_log_det(Estimate(jnp.zeros(()), jnp.zeros(())), 0), "n must"),
    ]
    for call, match in bad:
        with pytest.raises(ValueError, match=match):
            call()
