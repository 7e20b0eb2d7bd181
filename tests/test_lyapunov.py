"""Finite-time Lyapunov spectra and vectors (paper 003 section 4) against linear
systems, published reference values, log|det J| and the dense Jacobian's SVD."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SOLVE, generate_jit, make_mixture
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxflow as jf


@jax.jit
def _linear_flow(a, x0):
    return jf.lyapunov_spectrum(
        lambda x, t: a @ x, x0, 0.0, 60.0, steps=3000, transient_time=10.0, covariant_time=30.0
    )


@jax.jit
def _linear_map(m, x0):
    return jf.lyapunov_spectrum_of_map(
        lambda x, i: m @ x, x0, 3000, transient_steps=100, covariant_steps=200
    )


def _assert_columns_parallel(v, w, tol):
    v = np.asarray(v) / np.linalg.norm(v, axis=0)
    w = np.asarray(w) / np.linalg.norm(w, axis=0)
    np.testing.assert_allclose(np.abs(np.sum(v * w, axis=0)), 1.0, atol=tol)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_constant_linear_systems_give_their_eigenvalues(seed):
    """dx/dt = A x: exponents are the real parts of A's eigenvalues; x -> M x:
    the logs of |eigenvalues| (non-normal A and M: eigenvectors not orthogonal).
    The covariant (Ginelli) vectors are the eigenvectors, which the orthonormal
    vectors are not."""
    rng = np.random.default_rng(seed)
    n = 3
    lam = np.sort(rng.uniform(-2, 1, n))[::-1] + np.array([0.6, 0.0, -0.6])  # gaps >= 0.6
    p = np.eye(n) + 0.5 * rng.standard_normal((n, n))
    a = p @ np.diag(lam) @ np.linalg.inv(p)
    r = _linear_flow(jnp.asarray(a), jnp.zeros(n))  # the path stays at 0
    np.testing.assert_allclose(r.exponents, lam, atol=0.05)
    np.testing.assert_allclose(r.vectors.T @ r.vectors, np.eye(n), atol=1e-10)
    _assert_columns_parallel(r.covariant_vectors, p, 1e-8)
    mu = np.exp(lam / 4)
    m = p @ np.diag(mu) @ np.linalg.inv(p)
    r = _linear_map(jnp.asarray(m), jnp.zeros(n))
    np.testing.assert_allclose(r.exponents, np.log(mu), atol=0.05)
    _assert_columns_parallel(r.covariant_vectors, p, 1e-8)
    np.testing.assert_allclose(r.covariant_state, 0.0)


def test_henon_map_matches_reference_values():
    """Hénon map (a = 1.4, b = 0.3): lambda = (0.41922, -1.62319) per step
    (Sprott, Chaos and Time-Series Analysis, 2003, table A.1); the sum is
    log|det| = log 0.3 at every step."""

    def henon(x, i):
        return jnp.array([1 - 1.4 * x[0] ** 2 + x[1], 0.3 * x[0]])

    r = jax.jit(lambda x0: jf.lyapunov_spectrum_of_map(henon, x0, 100_000, transient_steps=1000))(
        jnp.array([0.1, 0.1])
    )
    np.testing.assert_allclose(r.exponents, [0.41922, -1.62319], atol=5e-3)
    np.testing.assert_allclose(r.exponents.sum(), np.log(0.3), rtol=1e-12)
    assert r.log_stretch.shape == (100_000, 2)
    np.testing.assert_allclose(r.log_stretch.mean(0)[r.order], r.exponents, rtol=1e-12)


def test_lorenz_flow_matches_reference_values():
    """Lorenz-63 (10, 28, 8/3): (0.9056, 0, -14.5723) (Sprott 2003); the sum is
    the constant divergence -(10 + 1 + 8/3). The covariant vector of the zero
    exponent is the flow direction f(x) (a shift along the orbit neither grows nor
    decays), which no orthonormal vector need be."""

    def lorenz(x, t):
        return jnp.array(
            [10 * (x[1] - x[0]), x[0] * (28 - x[2]) - x[1], x[0] * x[1] - 8 / 3 * x[2]]
        )

    r = jax.jit(
        lambda x0: jf.lyapunov_spectrum(
            lorenz,
            x0,
            0.0,
            1010.0,
            steps=101_000,
            transient_time=10.0,
            save_stretch=False,
            covariant_time=20.0,
        )
    )(jnp.array([1.0, 1.0, 1.0]))
    np.testing.assert_allclose(r.exponents, [0.9056, 0.0, -14.5723], atol=0.02)
    np.testing.assert_allclose(r.exponents.sum(), -(10 + 1 + 8 / 3), rtol=1e-6)
    assert r.log_stretch is None
    flow = lorenz(r.covariant_state, 0.0)
    _assert_columns_parallel(r.covariant_vectors[:, 1:2], flow[:, None], 1e-6)
    assert abs(float(r.vectors[:, 1] @ flow)) / float(jnp.linalg.norm(flow)) < 0.99


@eqx.filter_jit
def _generation_spectrum(field, z, frame):
    spec = jf.lyapunov_spectrum(
        lambda x, t: field.velocity(x, t), z, 1.0, 0.0, steps=1000, frame=frame
    )
    logdet = jf.log_det_generation(field, z, **SOLVE)
    jac = jf.jacobian(lambda y: jf.generate(field, y, **SOLVE), z)
    return spec, logdet, jac


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["full", "diag"]))
def test_generation_spectrum_matches_log_det_and_singular_vectors(seed, kind):
    """Over the generation span: sum(lambda) * T = log|det J_G| (the core issue's
    divergence route); the frame's first vector is J_G q_0 / |J_G q_0| (QR of
    J_G Q_0); and the top Lyapunov vector is the top left singular vector of the
    dense J_G where the top two singular values are well apart."""
    rng = np.random.default_rng(seed)
    n = 3
    field = jf.AnalyticField(make_mixture(rng, n, 2, kind), jf.RectifiedFlow())
    z = jnp.asarray(rng.standard_normal(n))
    frame, _ = np.linalg.qr(rng.standard_normal((n, n)))
    spec, logdet, jac = _generation_spectrum(field, z, jnp.asarray(frame))
    np.testing.assert_allclose(spec.exponents.sum() * 1.0, logdet, rtol=1e-6, atol=1e-6)
    assert np.all(np.diff(np.asarray(spec.exponents)) <= 0)
    np.testing.assert_allclose(spec.final_state, generate_jit(field, z, **SOLVE), atol=1e-8)
    pushed = np.asarray(jac) @ frame[:, 0]
    first = np.asarray(spec.vectors)[:, list(np.asarray(spec.order)).index(0)]
    assert abs(first @ pushed) / np.linalg.norm(pushed) > 1 - 1e-8
    u, s, _ = np.linalg.svd(np.asarray(jac))
    if s[1] / s[0] < 1e-2:
        assert abs(float(u[:, 0] @ spec.vectors[:, 0])) > 0.99


def test_top_k_uses_k_directions_and_agrees_with_the_full_spectrum():
    def henon(x, i):
        return jnp.array([1 - 1.4 * x[0] ** 2 + x[1], 0.3 * x[0]])

    full = jf.lyapunov_spectrum_of_map(henon, jnp.array([0.1, 0.1]), 5000, transient_steps=100)
    top = jf.lyapunov_spectrum_of_map(henon, jnp.array([0.1, 0.1]), 5000, k=1, transient_steps=100)
    assert top.vectors.shape == (2, 1) and top.exponents.shape == (1,)
    np.testing.assert_allclose(top.exponents[0], full.exponents[0], rtol=1e-10)
    np.testing.assert_allclose(abs(top.vectors[:, 0] @ full.vectors[:, 0]), 1.0, rtol=1e-10)


# one program per shape (eagerly, each of alignment's ops compiled on its own)
_alignment = jax.jit(jf.alignment)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 6), k=st.integers(1, 6))
def test_alignment_of_score_with_an_orthonormal_frame(seed, n, k):
    k = min(k, n)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    c = rng.uniform(0.1, 10)
    # the score along q_0: alignment one with q_0, zero with the rest
    np.testing.assert_allclose(_alignment(c * q[:, 0], q[:, :k]), np.eye(k)[0], atol=1e-12)
    s = rng.standard_normal((4, n))
    batch = np.asarray(_alignment(s, np.broadcast_to(q[:, :k], (4, n, k))))
    expect = np.abs(s @ q[:, :k]) / np.linalg.norm(s, axis=1, keepdims=True)
    np.testing.assert_allclose(batch, expect, rtol=1e-12)
    assert np.all(batch <= 1 + 1e-12)


def test_bad_input_raises():
    f = lambda x, t: -x  # noqa: E731
    x0 = jnp.ones(3)
    with pytest.raises(ValueError, match="k must"):
        jf.lyapunov_spectrum(f, x0, 0.0, 1.0, steps=10, k=4)
    with pytest.raises(ValueError, match="k must"):
        jf.lyapunov_spectrum_of_map(lambda x, i: x, x0, 10, k=0)
    with pytest.raises(ValueError, match="t1 equals t0"):
        jf.lyapunov_spectrum(f, x0, 1.0, 1.0, steps=10)
    with pytest.raises(ValueError, match="transient"):
        jf.lyapunov_spectrum(f, x0, 0.0, 1.0, steps=10, transient_time=1.0)
    with pytest.raises(ValueError, match="num_steps"):
        jf.lyapunov_spectrum_of_map(lambda x, i: x, x0, 0)
    with pytest.raises(ValueError, match="frame"):
        jf.lyapunov_spectrum_of_map(lambda x, i: x, x0, 5, k=2, frame=jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="covariant"):
        jf.lyapunov_spectrum_of_map(lambda x, i: x, x0, 5, covariant_steps=5)
    with pytest.raises(ValueError, match="covariant"):
        jf.lyapunov_spectrum(f, x0, 0.0, 1.0, steps=10, covariant_time=-0.1)
    # the ValueError users see; under the test run's jaxtyping checks (pyproject
    # addopts) the annotation `*batch n k` refuses the shapes first, a TypeError
    with pytest.raises((ValueError, TypeError), match="column axis|vectors"):
        jf.alignment(jnp.ones(3), jnp.ones((4, 2)))
    with pytest.raises(eqx.EquinoxRuntimeError, match="non-finite"):
        jf.lyapunov_spectrum(lambda x, t: x / (x - x), x0, 0.0, 1.0, steps=10)


def test_bad_schedule_and_old_keywords_raise():
    """Each keyword says its unit; the old unit-less ones are gone, and `steps` and
    `dt` exclude each other."""
    f = lambda x, t: -x  # noqa: E731
    x0 = jnp.ones(3)
    with pytest.raises(TypeError, match="transient"):
        jf.lyapunov_spectrum(f, x0, 0.0, 1.0, steps=10, transient=0.5)
    with pytest.raises(TypeError, match="covariant"):
        jf.lyapunov_spectrum_of_map(lambda x, i: x, x0, 5, covariant=1)
    with pytest.raises(ValueError, match="steps.*dt"):
        jf.lyapunov_spectrum(f, x0, 0.0, 1.0, steps=10, dt=0.1)
    with pytest.raises(ValueError, match="dt must"):
        jf.lyapunov_spectrum(f, x0, 0.0, 1.0, dt=-0.1)
    with pytest.raises(ValueError, match="steps must"):
        jf.lyapunov_spectrum(f, x0, 0.0, 1.0, steps=0)
    with pytest.raises(ValueError, match="transient_steps"):
        jf.lyapunov_spectrum_of_map(lambda x, i: x, x0, 5, transient_steps=-1)
    with pytest.raises(ValueError, match="covariant_time"):
        jf.lyapunov_spectrum(f, x0, 0.0, 1.0, steps=10, covariant_time=1.0)
    with pytest.raises(ValueError, match="no step is left"):
        jf.lyapunov_spectrum(f, x0, 0.0, 1.0, steps=10, transient_time=0.99)
    # check_throw's ValueError, or the annotation's TypeError under jaxtyping checks
    with pytest.raises((ValueError, TypeError), match="throw"):
        jf.lyapunov_spectrum_of_map(lambda x, i: x, x0, 5, throw=None)


def test_dt_and_the_default_give_equal_steps():
    """`dt` gives `ceil(|t1 - t0| / dt)` equal steps (a whole ratio up to rounding
    counts as whole); neither `steps` nor `dt` gives 1000."""
    a = jnp.array([[-1.0, 2.0], [0.0, -0.5]])
    f = lambda x, t: a @ x  # noqa: E731
    x0 = jnp.array([1.0, 1.0])
    run = lambda t1, **kw: jf.lyapunov_spectrum(f, x0, 0.0, t1, solver="euler", **kw)  # noqa: E731
    by_dt, by_steps = run(1.0, dt=0.01), run(1.0, steps=100)
    assert by_dt.log_stretch.shape == (100, 2)
    np.testing.assert_array_equal(by_dt.exponents, by_steps.exponents)
    assert run(1.1, dt=0.1).log_stretch.shape[0] == 11  # 1.1 / 0.1 = 11.000000000000002
    assert run(1.0, dt=0.3).log_stretch.shape[0] == 4  # steps of 0.25 <= dt
    default = run(-1.0)
    assert default.log_stretch.shape[0] == 1000
    np.testing.assert_array_equal(default.exponents, run(-1.0, steps=1000).exponents)


def _henon(x, i):
    return jnp.array([1 - 1.4 * x[0] ** 2 + x[1], 0.3 * x[0]])


# two starts on the attractor's basin, one far outside (|x| -> inf, then NaN in
# a few steps), one NaN
_HENON_STARTS = jnp.array([[0.1, 0.1], [0.0, 0.2], [5.0, 5.0], [jnp.nan, 0.0]])


def test_throw_false_keeps_the_good_points_of_a_batch():
    """With `throw=False` a vmapped batch returns each point's spectrum and result:
    the good points exactly as alone, the diverging and the NaN start NaN and
    `non_finite`; with `throw=True` the same batch raises."""

    def of_map(x0, throw):
        return jf.lyapunov_spectrum_of_map(
            _henon, x0, 500, transient_steps=20, covariant_steps=50, throw=throw
        )

    out = jax.jit(jax.vmap(lambda x0: of_map(x0, False)))(_HENON_STARTS)
    assert isinstance(out, jf.Outcome)
    np.testing.assert_array_equal(out.ok, [True, True, False, False])
    assert np.all(np.asarray(out.result == jf.RESULTS.non_finite) == [False, False, True, True])
    alone_jit = jax.jit(lambda x0: of_map(x0, True))  # one compile for both starts
    for i in (0, 1):
        alone = alone_jit(_HENON_STARTS[i])
        # equal up to rounding: batched linear algebra may round differently
        np.testing.assert_allclose(out.value.exponents[i], alone.exponents, rtol=1e-12)
        np.testing.assert_allclose(
            out.value.covariant_vectors[i], alone.covariant_vectors, rtol=1e-12
        )
        assert np.all(np.isfinite(out.value.exponents[i]))
    for leaf in (
        out.value.exponents,
        out.value.vectors,
        out.value.final_state,
        out.value.log_stretch,
        out.value.covariant_vectors,
        out.value.covariant_state,
    ):
        assert np.all(np.isnan(leaf[2:]))
    with pytest.raises(eqx.EquinoxRuntimeError, match="non-finite"):
        eqx.filter_jit(jax.vmap(lambda x0: of_map(x0, True)))(_HENON_STARTS)

    # a flow that blows up in finite time from x0 > 0 (at t = 1 / x0), and not from
    # x0 < 0
    def of_flow(x0, throw):
        return jf.lyapunov_spectrum(
            lambda x, t: x**2, x0, 0.0, 1.0, steps=200, save_stretch=False, throw=throw
        )

    starts = jnp.array([[-1.0], [10.0]])
    out = jax.jit(jax.vmap(lambda x0: of_flow(x0, False)))(starts)
    np.testing.assert_array_equal(out.ok, [True, False])
    np.testing.assert_array_equal(out.result == jf.RESULTS.non_finite, [False, True])
    # x(t) = -1 / (1 + t): the exponent is the mean of 2 x(t) over [0, 1], -2 log 2
    np.testing.assert_allclose(out.value.exponents[0], [-2 * np.log(2)], rtol=1e-6)
    assert np.isnan(out.value.exponents[1, 0]) and np.isnan(out.value.final_state[1, 0])
    with pytest.raises(eqx.EquinoxRuntimeError, match="non-finite"):
        jax.vmap(lambda x0: of_flow(x0, True))(starts)


def test_top_vector_on_the_fig3_ridge_is_the_top_singular_vector():
    """On the Fig. 3 basin boundary J_G stretches one direction ~10^3 times more
    than the other: the top Lyapunov vector must be the top left singular vector.
    The top right singular vector (at z) is the least stretched Lyapunov vector
    of the inversion flow from G(z), since J_G^{-1} = V S^{-1} U^T."""
    field = jf.AnalyticField(jf.data.fig3_mixture(jnp.float64), jf.RectifiedFlow())
    z = jnp.array([-0.18, 0.01])
    spec, _, jac = _generation_spectrum(field, z, jnp.eye(2))
    u, s, vt = np.linalg.svd(np.asarray(jac))
    assert s[1] / s[0] < 1e-2
    assert abs(float(u[:, 0] @ spec.vectors[:, 0])) > 1 - 1e-6
    np.testing.assert_allclose(spec.exponents.sum(), np.log(s).sum(), rtol=1e-6)
    back = jax.jit(
        lambda x: jf.lyapunov_spectrum(
            lambda y, t: field.velocity(y, t), x, 0.0, 1.0, steps=1000, save_stretch=False
        )
    )(spec.final_state)
    np.testing.assert_allclose(back.final_state, z, atol=1e-6)
    assert abs(float(vt[0] @ back.vectors[:, -1])) > 1 - 1e-6
    np.testing.assert_allclose(back.exponents.sum(), -np.log(s).sum(), rtol=1e-6)
