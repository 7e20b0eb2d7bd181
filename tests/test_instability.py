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
