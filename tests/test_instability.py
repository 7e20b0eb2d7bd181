"""Instability measures of paper 000 against independent routes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SOLVE, fd_jacobian
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxflow as jf


def _fig3_field():
    law = jf.GaussianMixture(
        jnp.array([1 / 3, 1 / 3, 1 / 3]),
        jnp.array([[-0.5, -0.35], [0.5, -0.35], [0.0, 0.5]]),
        jnp.array([0.01, 0.01, 0.01]),
    )
    return jf.AnalyticField(law, jf.RectifiedFlow())


FIELD = _fig3_field()
GEN = jax.jit(lambda z: jf.generate(FIELD, z, **SOLVE))


@settings(max_examples=10, deadline=None)
@given(
    z=st.tuples(st.floats(-1.5, 1.5), st.floats(-1.5, 1.5)),
    angle=st.floats(0, 2 * np.pi),
)
def test_intrinsic_instability_equals_finite_difference(z, angle):
    z = jnp.asarray(z)
    u = jnp.array([np.cos(angle), np.sin(angle)])
    e = jf.intrinsic_instability(GEN, z, 3.0 * u)
    # On the ridge between modes (e.g. z = (0, -1)) E reaches ~2.5e4 and central
    # differences only converge for h ~ 1e-7: refine h until two agree.
    fds = [
        float(jnp.linalg.norm(GEN(z + h * u) - GEN(z - h * u)) / (2 * h))
        for h in (1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
    ]
    converged = [b for a, b in zip(fds, fds[1:], strict=False) if abs(a - b) <= 3e-3 * abs(b)]
    assert converged, fds
    np.testing.assert_allclose(e, converged[0], rtol=5e-3)
    if fds[0] < 50:  # away from the ridge, the dense Jacobian too
        np.testing.assert_allclose(jf.jacobian(GEN, z), fd_jacobian(GEN, z), rtol=1e-4, atol=1e-6)


@settings(max_examples=10, deadline=None)
@given(
    z=st.tuples(st.floats(-1.0, 1.0), st.floats(-1.0, 1.0)),
    angle=st.floats(0, 2 * np.pi),
    delta=st.floats(0.01, 1.0),
)
def test_prop_2_1_small_perturbation_reaches_the_intrinsic_coefficient(z, angle, delta):
    """Prop. 2.1: some n has A_F(x, n) >= E_F(x, u) / (1 + Delta); the proof's n is
    a short step along the top right singular vector."""
    z = jnp.asarray(z)
    u = jnp.array([np.cos(angle), np.sin(angle)])
    e = jf.intrinsic_instability(GEN, z, u)
    _, _, vt = jnp.linalg.svd(jf.jacobian(GEN, z))
    ok = False
    for scale in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8):
        if jf.instability_coefficient(GEN, z, scale * vt[0]) >= e / (1 + delta):
            ok = True
            break
    assert ok


def test_prop_e_1_bound_holds_where_its_condition_does():
    zs = jnp.stack(jnp.meshgrid(jnp.linspace(-1, 1, 7), jnp.linspace(-1, 1, 7)), -1).reshape(-1, 2)
    checked = 0
    for direction in (jnp.array([0.02, 0.0]), jnp.array([0.0, 0.02])):
        bounds = jax.vmap(jf.instability_lower_bound, in_axes=(None, 0, None))(GEN, zs, direction)
        a = jax.vmap(jf.instability_coefficient, in_axes=(None, 0, None))(GEN, zs, direction)
        held = np.asarray(bounds.condition)
        assert held.sum() > 0
        assert np.all(np.asarray(a)[held] >= np.asarray(bounds.bound)[held] * (1 - 1e-9))
        checked += held.sum()
    assert checked >= 20


def test_prop_e_1_condition_is_reported_false_when_jvps_turn():
    """A rotation by a large angle along the segment makes JVPs point apart."""

    def twist(x):
        angle = 4.0 * x[0]
        c, s = jnp.cos(angle), jnp.sin(angle)
        return jnp.array([c * x[1], s * x[1]]) + jnp.array([0.0, 0.0]) * x[0]

    r = jf.instability_lower_bound(
        lambda x: twist(x) + x[0] * jnp.array([1e-3, 0.0]),
        jnp.array([0.0, 1.0]),
        jnp.array([1.0, 0.0]),
    )
    assert not bool(r.condition)
    assert float(r.min_inner) < 0


def test_instability_exceeds_one_between_modes_and_not_at_modes():
    centre = jnp.array([0.0, 0.0])
    e_centre = jf.intrinsic_instability(GEN, centre, jnp.array([0.0, 1.0]))
    assert float(e_centre) > 1
    # noise pointing deep into a mode's basin: the map contracts
    far = jnp.array([-1.5, -1.5])
    assert float(jf.geometric_mean_singular_value(GEN, far)) < 1


def test_amplified_error_bound_formula():
    h, m2 = 0.01, 3.0
    c = jnp.array([1.0, 2.0, 10.0])
    got = jf.amplified_error_bound(h, m2, c)
    expect = np.array(
        [h * m2 / 2, h * m2 * 1 / (2 * np.log(2)) * 2, h * m2 * 9 / (2 * np.log(10)) * 10]
    )
    np.testing.assert_allclose(got, expect, rtol=1e-12)


@pytest.mark.parametrize("bad", [jnp.zeros(2)])
def test_zero_direction_rejected(bad):
    with pytest.raises(Exception, match="non-zero"):
        jf.intrinsic_instability(GEN, jnp.zeros(2), bad)


# ---- no NaN as a result (issue 26) ----


def _nan_map(x):
    return x / 0 * 0


def _bend(x):  # A_F(0, (h, 0)) = 2 + h, A_F((1, 1), (h, 0)) = 4 + h; E_F(0, e_1) = 2
    return jnp.stack([2 * x[0] + x[0] ** 2, jnp.sin(x[1])])


def test_dense_jacobian_routes_refuse_a_nan_map():
    """Issue 26: `singular_values(lambda x: x / 0 * 0, z)` gave [nan nan]."""
    z = jnp.array([0.3, -0.2])
    for measure in (jf.singular_values, jf.jacobian, jf.geometric_mean_singular_value):
        with pytest.raises(ValueError, match="fn \\(_nan_map\\) returned NaN or inf"):
            measure(_nan_map, z)
    with pytest.raises(Exception, match="Jacobian of fn \\(_nan_map\\) is NaN or inf"):
        jax.jit(lambda z: jf.singular_values(_nan_map, z))(z)


def test_a_perturbation_lost_in_x_is_refused():
    """Issue 26: in float32, `n = (1e-30, 0)` at `x = (1, 1)`: `x + n == x` and `|n|`
    underflowed, so A was NaN (the true value is 2 + 1e-30). A perturbation too small
    for the dtype is refused with the smallest usable size."""
    x = jnp.ones(2, jnp.float32)
    with pytest.raises(ValueError, match="smallest usable size .* 8\\.4e-05"):
        jf.instability_coefficient(_bend, x, jnp.array([1e-30, 0.0], jnp.float32))
    with pytest.raises(Exception, match="smallest usable size"):
        jax.jit(lambda n: jf.instability_coefficient(_bend, x, n))(jnp.array([1e-30, 0.0]))
    # at x = 0 the same n is exact, and A = 2 + 1e-30 (|n| must not underflow)
    a = jf.instability_coefficient(_bend, jnp.zeros(2, jnp.float32), jnp.array([1e-30, 0.0]))
    np.testing.assert_allclose(a, 2.0, rtol=1e-6)
    # a usable size at x = (1, 1): 1e-2
    a = jf.instability_coefficient(_bend, x, jnp.array([1e-2, 0.0], jnp.float32))
    np.testing.assert_allclose(a, 4.01, rtol=1e-3)


def test_intrinsic_instability_of_a_tiny_direction():
    """E_F(x, u) does not depend on |u| (Def. 2.2): a direction whose norm
    underflows in float32 gives E, not NaN."""
    u = jnp.array([1e-30, 0.0], jnp.float32)
    e = jf.intrinsic_instability(_bend, jnp.zeros(2, jnp.float32), u)
    np.testing.assert_allclose(e, 2.0, rtol=1e-6)
