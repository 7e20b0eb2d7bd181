"""The Jacobian as JVP / VJP products (`jaxflow/_matrix_free/_operator.py`): a
generation map's products by forward mode and by the checkpointed reverse solve,
a plain map's by one linearisation and its transpose, all against the dense
`jax.jacfwd` Jacobian; and the inverse map's Jacobian as the inverse matrix."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import LAWS, PATHS, seeds
from hypothesis import given, settings

import jaxflow as jf
from jaxflow._matrix_free._operator import jacobian_products

N = 4
# a fixed-step solve: its products are the exact derivatives of the discrete map,
# so they meet the dense Jacobian of the same map to round-off
SOLVE = dict(solver="tsit5", steps=16)


def products(fn, x):
    y, jvp, vjp = jacobian_products(fn, x, "test")
    eye = jnp.eye(x.shape[0], dtype=x.dtype)
    return y, jax.vmap(jvp, 1, 1)(eye), jax.vmap(vjp, 1, 1)(eye)


@eqx.filter_jit
def _products_and_dense(field, z):
    """The map's products beside `generate` and its dense `jacfwd`, one program per
    law and path."""
    g = jf.generation_map(field, **SOLVE)
    solve = lambda z: jf.generate(field, z, **SOLVE)  # noqa: E731
    return *products(g, z), solve(z), jax.jacfwd(solve)(z)


@pytest.mark.parametrize(
    "law, path",
    [("gaussian", "rectified_flow"), ("mixture_full", "cosine"), ("neighbours", "rectified_flow")],
)
@settings(max_examples=1, deadline=None)
@given(seed=seeds())
def test_generation_map_products_are_the_jacobian(law, path, seed):
    rng = np.random.default_rng(seed)
    field = jf.AnalyticField(LAWS[law](rng, N), PATHS[path])
    z = jnp.asarray(rng.standard_normal(N))
    y, jv, jtu, x, dense = _products_and_dense(field, z)
    np.testing.assert_allclose(y, x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(jv, dense, rtol=1e-10, atol=1e-12)
    # reverse mode through the checkpointed solve
    np.testing.assert_allclose(jtu, dense.T, rtol=1e-10, atol=1e-12)


@eqx.filter_jit
def _there_and_back(field, z):
    g = jf.generation_map(field, **SOLVE)
    g_inv = jf.generation_map(field, inverse=True, checkpoints=8, **SOLVE)
    x, jac, _ = products(g, z)
    return x, jac, *products(g_inv, x)


def test_inverse_map_jacobian_is_the_inverse():
    rng = np.random.default_rng(0)
    field = jf.AnalyticField(LAWS["mixture_full"](rng, N), PATHS["rectified_flow"])
    z = jnp.asarray(rng.standard_normal(N))
    x, jac, z_back, jac_inv, jac_inv_t = _there_and_back(field, z)
    # the discrete maps are inverse to the solver's order (16 tsit5 steps)
    np.testing.assert_allclose(z_back, z, atol=1e-5)
    np.testing.assert_allclose(jac_inv @ jac, np.eye(N), atol=1e-4)
    np.testing.assert_allclose(jac_inv_t, jac_inv.T, rtol=1e-10, atol=1e-12)


def test_plain_map_products():
    a = jnp.asarray(np.random.default_rng(1).standard_normal((5, 5)))

    def fn(x):
        return jnp.tanh(a @ x) + x**2

    x = jnp.linspace(-1.0, 1.0, 5)
    y, jv, jtu, fx, dense = jax.jit(lambda x: (*products(fn, x), fn(x), jax.jacfwd(fn)(x)))(x)
    np.testing.assert_allclose(y, fx)
    np.testing.assert_allclose(jv, dense, rtol=1e-13)
    np.testing.assert_allclose(jtu, dense.T, rtol=1e-13)


def test_settings_are_static_and_grids_concrete():
    field = jf.AnalyticField(jf.Gaussian(jnp.zeros(2), 4 * jnp.eye(2)), jf.RectifiedFlow())
    times = np.linspace(0.0, 1.0, 9)
    g = jf.generation_map(field, solver="heun", times=times)
    z = jnp.array([0.5, -1.0])
    reference = jax.jit(lambda z: jf.generate(field, z, solver="heun", times=times))(z)
    np.testing.assert_allclose(jax.jit(lambda g, z: g(z))(g, z), reference)
    assert g.solve_kwargs == {"solver": "heun", "times": times}
    # a JAX grid closed over by jitted code is concrete there, and stays so
    grid = jnp.asarray(times)
    inside = jax.jit(lambda z: jf.generation_map(field, solver="heun", times=grid)(z))
    np.testing.assert_allclose(inside(z), reference)


def test_checks():
    field = jf.AnalyticField(jf.Gaussian(jnp.zeros(2), jnp.eye(2)), jf.RectifiedFlow())
    with pytest.raises(ValueError, match="adjoint"):
        jf.generation_map(field, adjoint=None)
    with pytest.raises(ValueError, match="throw"):
        jf.generation_map(field, throw=False)
    with pytest.raises(ValueError, match="checkpoints"):
        jf.generation_map(field, checkpoints=0)
    unchecked = getattr(jf.generation_map, "__wrapped__", jf.generation_map)  # as users run it
    with pytest.raises(ValueError, match="jaxflow field"):
        unchecked("field")
    with pytest.raises(ValueError, match="inverse must be True or False"):
        unchecked(field, inverse="yes")  # bool("no") is True: a truthy stand-in is refused
    with pytest.raises(ValueError, match="shape"):
        jacobian_products(lambda x: x[:1], jnp.ones(2), "test")
    with pytest.raises(ValueError, match="finite"):
        jacobian_products(lambda x: x, jnp.array([1.0, jnp.nan]), "test")


def test_generation_map_checks_its_settings_when_built():
    """Bad solver settings are refused by `generation_map` itself, with the messages
    `jf.generate` gives, not at the map's first call."""
    field = jf.AnalyticField(jf.Gaussian(jnp.zeros(2), jnp.eye(2)), jf.RectifiedFlow())
    for bad, match in [
        (dict(solver="rk99"), "unknown solver 'rk99'"),
        (dict(solver="euler", steps=0), "steps must be a positive int"),
        (dict(solver="euler"), "give `steps=`"),
        (dict(steps=4, rtol=1e-3), "rtol/atol set an adaptive solve"),
        (dict(max_steps=None), "max_steps=None"),
        (dict(times=[0.5, 0.2]), "times must increase"),
        (dict(t_noise=2.0), r"t_start=2\.0 is outside the path's range"),
        (dict(stpes=4), r"jf\.generate has no setting 'stpes'; its settings are solver, steps"),
    ]:
        with pytest.raises(ValueError, match=match):
            jf.generation_map(field, **bad)
    with pytest.raises(ValueError, match=r"jf\.invert has no setting 'z'"):
        jf.generation_map(field, inverse=True, z=jnp.zeros(2))
    with pytest.raises(ValueError, match=r"t_noise=0\.0 must be greater than t_data=0\.5"):
        jf.generation_map(field, inverse=True, t_noise=0.0, t_data=0.5)


def test_reverse_mode_failure_points_to_generation_map():
    """A map that cannot be transposed (`jf.generate`'s forward-mode solve, a
    `while_loop`) fails in the matrix-free routes with advice, while tracing."""
    field = jf.AnalyticField(jf.Gaussian(jnp.zeros(2), jnp.eye(2)), jf.RectifiedFlow())
    z, key = jnp.array([0.5, -1.0]), jax.random.key(0)

    def looped(x):
        return jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (2 * c[0], c[1] + 1), (x, 0))[0]

    for fn in (lambda z: jf.generate(field, z, solver="euler", steps=2), looped):
        with pytest.raises(ValueError, match=r"top_singular_values: .*jf\.generation_map") as info:
            jf.top_singular_values(fn, z, 1, key=key)
        assert info.value.__cause__ is not None
