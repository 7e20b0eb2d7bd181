"""The ODE entry points name each cause of a failure: solver settings checked up
front, a span that ends where the field is singular, a field that is NaN where the
solve starts, a network of the wrong shape, a reversed span; and the public field
methods refuse points and times of the wrong shape."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxflow as jf

FIELD = jf.AnalyticField(jf.Gaussian(jnp.zeros(2), jnp.eye(2)), jf.RectifiedFlow())
Z = jnp.array([0.3, -0.2])
# under jit a check on a traced value raises through eqx.error_if
RUNTIME = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError)


def plain(function):
    """`function` without the test suite's jaxtyping hook (tests/test_annotations.py
    checks the hook): what a user calls, whose own checks are tested here."""
    return getattr(function, "__wrapped__", function)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rtol=float("nan")), "rtol must be a finite number > 0"),
        (dict(rtol=0.0), "rtol must be a finite number > 0"),
        (dict(atol=-1.0), "atol must be a finite number > 0"),
        (dict(rtol="1e-6"), "rtol must be a finite number > 0"),
        (dict(max_steps=0), "max_steps must be a positive int"),
        (dict(max_steps=10.5), "max_steps must be a positive int"),
        (dict(max_steps=None), "run forever"),
        (dict(solver="euler", steps=0), "steps must be a positive int"),
        (dict(solver="euler", steps=10, rtol=1e-6), "steps are fixed"),
        (dict(solver="rk4"), "unknown solver"),
        (dict(solver="euler"), "no error estimate"),
        (dict(t_noise=0.3, t_data=0.8), "t_noise=0.3 must be greater than t_data=0.8"),
        (dict(t_noise=0.5, t_data=0.5), "must be greater than"),
        (dict(t_noise=1.5), "outside the path's range"),
        (dict(t_noise=np.float64(2.0)), "outside the path's range"),
        (dict(t_noise=jnp.array([1.0, 0.5])), "scalar time"),
        (dict(times=np.array([0.0, 0.5, 0.4, 1.0])), "increase strictly"),
    ],
)
def test_bad_settings_raise_before_solving(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plain(jf.generate)(FIELD, Z, **kwargs)


@pytest.mark.parametrize(
    "kwargs", [dict(max_steps=np.int64(100)), dict(solver="euler", steps=np.int32(10))]
)
def test_numpy_integers_are_counts(kwargs):
    assert np.all(np.isfinite(np.asarray(jf.generate(FIELD, Z, **kwargs))))


def test_traced_settings_are_checked_under_jit():
    with_rtol = jax.jit(lambda r: jf.generate(FIELD, Z, rtol=r))  # one program for both
    with pytest.raises(RUNTIME, match="rtol must be a finite number > 0"):
        with_rtol(jnp.nan)
    with pytest.raises(RUNTIME, match="must be greater than"):
        jax.jit(lambda t: jf.generate(FIELD, Z, t_noise=0.3, t_data=t))(0.8)
    np.testing.assert_allclose(with_rtol(1e-8), jf.generate(FIELD, Z))


EMPIRICAL = jf.AnalyticField(jf.Empirical(jnp.array([[0.0, 0.0], [1.0, 1.0]])), jf.RectifiedFlow())
NOISE_NET = jf.LearnedField(lambda x, t: 0.5 * x, jf.RectifiedFlow(), "noise")


@pytest.mark.parametrize(
    "field, fix",
    [(EMPIRICAL, "t_data=0.001"), (NOISE_NET, "t_noise=0.999")],
    ids=["empirical_at_t_0", "noise_network_at_alpha_0"],
)
def test_a_singular_end_is_named_with_its_fix(field, fix):
    """Before, both ran out of steps and were told to raise max_steps."""
    with pytest.raises(RUNTIME, match=f"singular at t = .*{fix}"):
        jf.generate(field, Z)
    out = jf.generate(field, Z, throw=False)
    assert bool(out.result == jf.RESULTS.singular_field)
    # the fix the message gives works
    kwargs = {fix.split("=")[0]: float(fix.split("=")[1])}
    assert np.all(np.isfinite(np.asarray(jf.generate(field, Z, **kwargs))))


def test_a_singular_end_a_solver_never_evaluates_is_fine():
    """Euler towards t = 0 never evaluates the field there: no error."""
    x = jf.generate(EMPIRICAL, Z, solver="euler", steps=20)
    assert np.all(np.isfinite(np.asarray(x)))


def test_a_nan_field_does_not_hang_and_is_named():
    """An adaptive solve of a NaN field rejects every step; diffrax without a bound
    (max_steps=None) never returned. The bound is required, and the cause named."""
    field = jf.LearnedField(lambda x, t: x * jnp.nan, jf.RectifiedFlow(), "velocity")
    with pytest.raises(RUNTIME, match="velocity is NaN or inf at the starting point"):
        jf.generate(field, Z)
    assert bool(jf.generate(field, Z, throw=False).result == jf.RESULTS.field_non_finite)


@pytest.mark.parametrize(
    "network, shape",
    [(lambda x, t: jnp.sum(x), r"\(\)"), (lambda x, t: jnp.zeros(3), r"\(3,\)")],
    ids=["scalar", "wrong_length"],
)
@pytest.mark.parametrize("kind", ["learned", "interpolant"])
def test_a_network_of_the_wrong_shape_is_named(network, shape, kind):
    if kind == "learned":
        field = jf.LearnedField(network, jf.RectifiedFlow(), "velocity")
    else:
        field = jf.InterpolantField(network, jf.RectifiedFlow())
    with pytest.raises(ValueError, match=f"network returned shape {shape}"):
        jf.generate(field, Z, solver="euler", steps=4)
    with pytest.raises(ValueError, match=f"network returned shape {shape}"):
        plain(type(field).velocity)(field, Z, 0.5)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda f: plain(type(f).velocity)(f, jnp.zeros(1), 0.5), "length 1, the field's"),
        (lambda f: plain(type(f).score)(f, jnp.zeros((3, 2)), 0.5), r"got shape \(3, 2\)"),
        (lambda f: plain(type(f).denoise)(f, Z, jnp.array([0.2, 0.5])), "scalar time"),
        (lambda f: plain(type(f).divergence)(f, Z, jnp.ones((1,))), "scalar time"),
        (lambda f: plain(type(f).noise)(f, jnp.zeros(3), 0.5), "length 3"),
    ],
)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_field_methods_refuse_wrong_shapes(call, match, jit):
    """Before, `velocity(zeros(1), t)` on an n = 2 law broadcast to an answer."""
    run = eqx.filter_jit(call) if jit else call
    with pytest.raises(ValueError, match=match):
        run(FIELD)


def test_field_methods_take_integer_points():
    velocity = plain(jf.AnalyticField.velocity)
    np.testing.assert_allclose(
        velocity(FIELD, jnp.array([1, 0]), 0.5), FIELD.velocity(jnp.array([1.0, 0.0]), 0.5)
    )


def test_reverse_mode_with_a_reverse_adjoint():
    """`jax.grad` through the default solve fails (forward mode is the default, and
    the error names this adjoint: `test_errors`); with that adjoint it agrees with
    forward mode."""
    loss = lambda adjoint: lambda z: jnp.sum(jf.generate(FIELD, z, adjoint=adjoint) ** 2)  # noqa: E731
    # jitted: eagerly the forward and the backward pass each compile
    grad = jax.jit(jax.grad(loss(diffrax.RecursiveCheckpointAdjoint())))(Z)
    np.testing.assert_allclose(grad, jax.jit(jax.jacfwd(loss(None)))(Z), rtol=1e-6)
