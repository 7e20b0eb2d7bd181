"""The Jacobian as JVP / VJP products (`jaxflow/_matrix_free/_operator.py`): a
generation map's products by forward mode and by the checkpointed reverse solve,
a plain map's by one linearisation and its transpose, all against the dense
`jax.jacfwd` Jacobian; and the inverse map's Jacobian as the inverse matrix."""

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


@pytest.mark.parametrize(
    "law, path",
    [("gaussian", "rectified_flow"), ("mixture_full", "cosine"), ("neighbours", "rectified_flow")],
)
@settings(max_examples=1, deadline=None)
@given(seed=seeds())
def test_generation_map_products_are_the_jacobian(law, path, seed):
    rng = np.random.default_rng(seed)
    field = jf.AnalyticField(LAWS[law](rng, N), PATHS[path])
    g = jf.generation_map(field, **SOLVE)
    z = jnp.asarray(rng.standard_normal(N))
    y, jv, jtu = jax.jit(products)(g, z)
    dense = jax.jacfwd(lambda z: jf.generate(field, z, **SOLVE))(z)
    np.testing.assert_allclose(y, jf.generate(field, z, **SOLVE), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(jv, dense, rtol=1e-10, atol=1e-12)
    # reverse mode through the checkpointed solve
    np.testing.assert_allclose(jtu, dense.T, rtol=1e-10, atol=1e-12)


def test_inverse_map_jacobian_is_the_inverse():
    rng = np.random.default_rng(0)
    field = jf.AnalyticField(LAWS["mixture_full"](rng, N), PATHS["rectified_flow"])
    g = jf.generation_map(field, **SOLVE)
    g_inv = jf.generation_map(field, inverse=True, checkpoints=8, **SOLVE)
    z = jnp.asarray(rng.standard_normal(N))
    x, jac, _ = products(g, z)
    z_back, jac_inv, jac_inv_t = products(g_inv, x)
    # the discrete maps are inverse to the solver's order (16 tsit5 steps)
    np.testing.assert_allclose(z_back, z, atol=1e-5)
    np.testing.assert_allclose(jac_inv @ jac, np.eye(N), atol=1e-4)
    np.testing.assert_allclose(jac_inv_t, jac_inv.T, rtol=1e-10, atol=1e-12)


def test_plain_map_products():
    a = jnp.asarray(np.random.default_rng(1).standard_normal((5, 5)))

    def fn(x):
        return jnp.tanh(a @ x) + x**2

    x = jnp.linspace(-1.0, 1.0, 5)
    y, jv, jtu = products(fn, x)
    dense = jax.jacfwd(fn)(x)
    np.testing.assert_allclose(y, fn(x))
    np.testing.assert_allclose(jv, dense, rtol=1e-13)
    np.testing.assert_allclose(jtu, dense.T, rtol=1e-13)


def test_settings_are_static_and_grids_concrete():
    field = jf.AnalyticField(jf.Gaussian(jnp.zeros(2), 4 * jnp.eye(2)), jf.RectifiedFlow())
    times = np.linspace(0.0, 1.0, 9)
    g = jf.generation_map(field, solver="heun", times=times)
    z = jnp.array([0.5, -1.0])
    np.testing.assert_allclose(
        jax.jit(lambda g, z: g(z))(g, z), jf.generate(field, z, solver="heun", times=times)
    )
    assert g.solve_kwargs == {"solver": "heun", "times": times}
    # a JAX grid closed over by jitted code is concrete there, and stays so
    grid = jnp.asarray(times)
    inside = jax.jit(lambda z: jf.generation_map(field, solver="heun", times=grid)(z))
    np.testing.assert_allclose(inside(z), jf.generate(field, z, solver="heun", times=times))


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
