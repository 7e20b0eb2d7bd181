"""Solver behaviour: convergence order (fitted), float32 defaults, failures surface."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SOLVE, fit_slope, generate_jit, jacobian_of_generation, make_mixture, random_spd
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxflow as jf


# Module-level jits taking the field as an argument: tests (and hypothesis examples)
# with a field of the same type and shapes reuse one compiled program.
@eqx.filter_jit
def _generate_batch(field, zs, **kw):
    return jax.vmap(lambda z: jf.generate(field, z, **kw))(zs)


@eqx.filter_jit
def _with_jacobian(field, z, **kw):
    return jf.generate_with_jacobian(field, z, **kw)


@eqx.filter_jit
def _round_trip(field, z):
    return jf.invert(field, jf.generate(field, z, **SOLVE), **SOLVE)


def _toy_field():
    law = jf.GaussianMixture(
        jnp.array([0.3, 0.3, 0.4]),
        jnp.array([[-0.6, -0.4], [0.6, -0.4], [0.0, 0.6]]),
        jnp.array([0.02, 0.02, 0.02]),
    )
    return jf.AnalyticField(law, jf.RectifiedFlow())


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2)])
def test_generation_error_convergence_order(solver, order):
    field = _toy_field()
    zs = jnp.array([[0.1, 0.2], [-0.3, 0.5], [0.4, -0.1]])
    exact = _generate_batch(field, zs, **SOLVE)  # one program for both solvers
    steps = [200, 400, 800, 1600]

    @eqx.filter_jit
    def err(field, zs, n):
        x = jax.vmap(lambda z: jf.generate(field, z, solver=solver, steps=n))(zs)
        return jnp.linalg.norm(x - exact, axis=-1)

    errors = [float(jnp.mean(err(field, zs, n))) for n in steps]
    slope = fit_slope(steps, errors)
    assert abs(slope + order) < 0.2, (slope, errors)


# Reconstruction (invert then regenerate on the same grid): Euler's round trip
# error is O(h). Heun's is O(h^3), not O(h^2): its principal error term is odd in
# h, so the h^3 local errors of the forward and the backward step cancel to
# leading order (as for any method of even order), leaving the next term.
@pytest.mark.parametrize("solver,slope_expected", [("euler", -1), ("heun", -3)])
def test_reconstruction_error_convergence_order(solver, slope_expected):
    field = _toy_field()
    xs = jnp.array([[0.1, 0.2], [-0.3, 0.5], [0.4, -0.1]])
    steps = [200, 400, 800, 1600]

    @eqx.filter_jit
    def err(field, xs, n):
        return jax.vmap(lambda x: jf.reconstruction_error(field, x, solver=solver, steps=n))(xs)

    errors = [float(jnp.mean(err(field, xs, n))) for n in steps]
    slope = fit_slope(steps, errors)
    assert abs(slope - slope_expected) < 0.25, (slope, errors)


def test_adaptive_default_is_accurate_in_float64_and_float32():
    field = _toy_field()
    z = jnp.array([0.3, -0.8])
    ref = generate_jit(field, z, solver="dopri8", rtol=1e-12, atol=1e-12)
    x64 = generate_jit(field, z)
    np.testing.assert_allclose(x64, ref, atol=1e-6)
    field32 = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, field
    )
    zs = jax.random.normal(jax.random.PRNGKey(0), (512, 2), jnp.float32) * 1.5
    x32 = _generate_batch(field32, zs)
    assert x32.dtype == jnp.float32
    ref32 = _generate_batch(field, zs.astype(jnp.float64), **SOLVE)
    assert float(jnp.max(jnp.abs(x32 - ref32))) < 1e-3


def test_vmap_matches_single_calls_and_jvp_goes_through():
    field = _toy_field()
    zs = jax.random.normal(jax.random.PRNGKey(1), (5, 2))
    single = jax.jit(lambda z: jf.generate(field, z))
    batched = jax.jit(jax.vmap(single))(zs)
    for i in range(5):
        np.testing.assert_allclose(batched[i], single(zs[i]), rtol=1e-10)
    # jitted: eagerly, the JVP's many small operations each compile
    _, tangent = jax.jit(lambda z, u: jax.jvp(lambda z: jf.generate(field, z), (z,), (u,)))(
        zs[0], jnp.array([1.0, 0.0])
    )
    assert bool(jnp.all(jnp.isfinite(tangent)))


def test_any_diffrax_solver_instance_is_accepted():
    field = _toy_field()
    z = jnp.array([0.3, -0.8])
    a = generate_jit(field, z, solver=diffrax.Tsit5(), rtol=1e-10, atol=1e-10)
    b = generate_jit(field, z, solver="dopri5", rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(a, b, atol=1e-7)


def test_solver_failure_raises_instead_of_nan():
    field = _toy_field()
    with pytest.raises(Exception, match="max_steps"):
        generate_jit(field, jnp.array([0.3, -0.8]), max_steps=3)
    emp = jf.AnalyticField(jf.Empirical(jnp.array([[0.0, 0.0], [1.0, 1.0]])), jf.RectifiedFlow())
    # Heun evaluates the field at t = 0, where an Empirical law is singular
    # eager: the end is a time known in Python only while the field is not traced
    with pytest.raises(Exception, match="singular at t = 0.*t_data=0.001"):
        jf.generate(emp, jnp.array([0.5, 0.5]), solver="heun", steps=10)
    # stopping short of the singular end works
    x = generate_jit(emp, jnp.array([0.5, 0.4]), t_data=1e-3)
    assert bool(jnp.all(jnp.isfinite(x)))


def test_one_hard_point_fails_the_batch_loudly():
    field = _toy_field()
    zs = jnp.array([[0.3, -0.8], [jnp.nan, 0.0]])
    with pytest.raises(Exception, match="NaN"):
        jax.block_until_ready(_generate_batch(field, zs))


def test_variational_jacobian_equals_jacfwd_through_the_solver():
    field = jf.AnalyticField(make_mixture(np.random.default_rng(6), 3, 3, "full"), jf.Cosine())
    z = jnp.array([0.4, -1.1, 0.3])
    x, jac = _with_jacobian(field, z, **SOLVE)
    np.testing.assert_allclose(x, generate_jit(field, z, **SOLVE), rtol=1e-8, atol=1e-8)
    jacfwd = eqx.filter_jit(
        lambda field, z: jax.jacfwd(lambda y: jf.generate(field, y, **SOLVE))(z)
    )
    np.testing.assert_allclose(jac, jacfwd(field, z), rtol=1e-6, atol=1e-8)


def test_a_time_grid_is_walked_backwards_by_generate_and_forwards_by_invert():
    """`times=`: Euler on a geometric grid against the same Euler steps written out,
    and an equal-step grid against `steps=`."""
    field = jf.AnalyticField(make_mixture(np.random.default_rng(3), 2), jf.OrnsteinUhlenbeck(3.0))
    times = np.concatenate([[0.0], np.geomspace(1e-2, 3.0, 12)])
    z = jnp.array([0.3, -1.2])
    x = z
    for t, t_next in zip(times[::-1][:-1], times[::-1][1:], strict=True):
        x = x + (t_next - t) * field.velocity(x, t)
    np.testing.assert_allclose(jf.generate(field, z, solver="euler", times=times), x, rtol=1e-12)
    y = x
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        y = y + (t_next - t) * field.velocity(y, t)
    np.testing.assert_allclose(jf.invert(field, x, solver="euler", times=times), y, rtol=1e-12)
    np.testing.assert_allclose(
        jf.generate(field, z, solver="heun", times=np.linspace(0.0, 3.0, 9)),
        jf.generate(field, z, solver="heun", steps=8),
        rtol=1e-12,
    )
    with pytest.raises(ValueError, match="increase strictly"):
        jf.generate(field, z, solver="euler", times=times[::-1])
    with pytest.raises(ValueError, match="not both"):
        jf.generate(field, z, solver="euler", times=times, steps=4)
    with pytest.raises(ValueError, match="outside the path's range"):
        jf.invert(field, z, solver="euler", times=np.array([0.0, 1.0, 4.0]))


# n from a small grid (1, the scalar case, to 4): each n compiles its two programs
# once, and the examples draw the law's values under those shapes
@settings(max_examples=8, deadline=None)
@given(n=st.sampled_from([1, 3, 4]), seed=st.integers(0, 2**31 - 1), cond=st.floats(1.0, 50.0))
def test_gaussian_generation_map_is_affine(n, seed, cond):
    rng = np.random.default_rng(seed)
    cov = random_spd(rng, n, cond)
    law = jf.Gaussian(rng.uniform(-2, 2, n), cov)
    field = jf.AnalyticField(law, jf.RectifiedFlow())
    z = jnp.asarray(rng.standard_normal(n))
    root = law.sqrt_covariance()
    np.testing.assert_allclose(root @ root, cov, rtol=1e-10, atol=1e-12)
    x = generate_jit(field, z, **SOLVE)
    np.testing.assert_allclose(x, law.mean + root @ z, rtol=1e-7, atol=1e-7)
    jac = jacobian_of_generation(field, z)
    np.testing.assert_allclose(jac, root, rtol=1e-6, atol=1e-7)
    gm = np.exp(np.linalg.slogdet(jac)[1] / n)
    np.testing.assert_allclose(gm, np.linalg.det(cov) ** (1 / (2 * n)), rtol=1e-6)
    s = np.linalg.svd(jac, compute_uv=False)
    np.testing.assert_allclose(np.sort(s), np.sort(np.sqrt(np.linalg.eigvalsh(cov))), rtol=1e-6)


def test_public_singular_value_functions_on_gaussian():
    rng = np.random.default_rng(3)
    cov = random_spd(rng, 4, 20.0)
    law = jf.Gaussian(np.zeros(4), cov)
    field = jf.AnalyticField(law, jf.RectifiedFlow())
    z = jnp.asarray(rng.standard_normal(4))

    @eqx.filter_jit  # one program for the three (their solves are the same)
    def measures(field, z):
        def gen(y):
            return jf.generate(field, y, **SOLVE)

        return (
            jf.singular_values(gen, z),
            jf.geometric_mean_singular_value(gen, z),
            jf.log_abs_det_jacobian(gen, z),
        )

    sv, gm, logdet = measures(field, z)
    np.testing.assert_allclose(sv, np.sqrt(np.linalg.eigvalsh(cov))[::-1], rtol=1e-6)
    np.testing.assert_allclose(gm, np.linalg.det(cov) ** (1 / 8), rtol=1e-6)
    np.testing.assert_allclose(logdet, 0.5 * np.linalg.slogdet(cov)[1], rtol=1e-6)
    x, jac = _with_jacobian(field, z, **SOLVE)
    np.testing.assert_allclose(jac, law.sqrt_covariance(), rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(x, law.sqrt_covariance() @ z, rtol=1e-7, atol=1e-8)


def test_generate_then_invert_is_identity_on_every_path():
    rng = np.random.default_rng(4)
    law = jf.Gaussian(rng.uniform(-1, 1, 3), random_spd(rng, 3))
    z = jnp.asarray(rng.standard_normal(3))
    for path in (jf.RectifiedFlow(), jf.OrnsteinUhlenbeck(5.0), jf.Cosine()):
        field = jf.AnalyticField(law, path)
        np.testing.assert_allclose(_round_trip(field, z), z, rtol=1e-7, atol=1e-7)
