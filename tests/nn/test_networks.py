"""jaxflow.nn: shapes, jit/vmap/jacfwd through the networks, Equinox-style
initialisation, and the channel-last layers against Equinox's own."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxflow as jf


def test_networks_shapes_jit_vmap_and_jacobian():
    key = jax.random.PRNGKey(0)
    mlp = jf.nn.MLP(3, 32, 2, key=key)
    out = eqx.filter_jit(lambda m, xs: jax.vmap(m, in_axes=(0, None))(xs, 0.3))(
        mlp, jnp.ones((5, 3))
    )
    # the checks in NumPy: each eager jnp operation compiles a program
    assert out.shape == (5, 3) and np.all(np.isfinite(out))

    @eqx.filter_jit
    def at_two_times(net, x):
        return net(x, 0.5), net(x, 0.1)

    # two levels 8x8 -> 4x4, attention at 4x4
    net = jf.nn.UNet((1, 8, 8), 8, (1, 2), heads=2, groups=4, key=key)
    # every parameter is concrete and drawn as Equinox would: U(+-1/sqrt(fan_in))
    assert not any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(net))
    w = np.asarray(net.conv_in.weight)
    assert np.abs(w).max() <= 1 / 3 and np.abs(w).max() > 0.25 and w.std() > 0.1
    np.testing.assert_array_equal(net.norm_out.weight, 1.0)
    other = jf.nn.UNet((1, 8, 8), 8, (1, 2), heads=2, groups=4, key=jax.random.PRNGKey(9))
    assert not np.allclose(other.conv_in.weight, w)
    x = jax.random.normal(key, (64,))
    y, y_early = at_two_times(net, x)
    assert y.shape == (64,) and np.all(np.isfinite(y))
    assert not np.allclose(y, y_early)  # the time conditioning reaches the output

    # the Lyapunov and Jacobian tools need forward-mode derivatives through it
    @eqx.filter_jit
    def jacobian_and_jvp(field, x, u):
        v = lambda y: field.velocity(y, 0.5)  # noqa: E731
        return jax.jacfwd(v)(x), jax.jvp(v, (x,), (u,))[1]

    field = jf.LearnedField(net, jf.RectifiedFlow(), "velocity")
    u = jax.random.normal(jax.random.PRNGKey(1), (64,))
    jac, v = jacobian_and_jvp(field, x, u)
    np.testing.assert_allclose(np.asarray(jac) @ np.asarray(u), v, rtol=1e-5, atol=1e-6)


@eqx.filter_jit
def _apply(conv, ref, gn, gn_ref, x):
    """Both layers on one image in one compiled program: eagerly, each operation
    compiles its own."""
    chw = jnp.transpose(x, (2, 0, 1))
    return (
        (conv(x), jnp.transpose(ref(chw), (1, 2, 0))),
        (gn(x), jnp.transpose(gn_ref(chw), (1, 2, 0))),
    )


@pytest.mark.parametrize("stride", [1, 2])
def test_channel_last_layers_match_equinox(stride):
    """The UNet's own channel-last convolution and group norm (fast inside XLA:CPU
    loops) against Equinox's channel-first layers on the transposed image."""
    # the layers built abstractly and given the same weights, drawn in NumPy: an
    # eager random initialiser compiles a program per shape
    rng = np.random.default_rng(stride)
    key = jax.random.PRNGKey(stride)
    ref = eqx.filter_eval_shape(eqx.nn.Conv2d, 6, 4, 3, stride=stride, padding=1, key=key)
    weight, bias = rng.uniform(-0.2, 0.2, (4, 6, 3, 3)), rng.uniform(-0.2, 0.2, (4, 1, 1))
    ref = eqx.tree_at(lambda c: (c.weight, c.bias), ref, (jnp.asarray(weight), jnp.asarray(bias)))
    conv = eqx.tree_at(
        lambda c: (c.weight, c.bias),
        eqx.filter_eval_shape(jf.nn.Conv, 6, 4, 3, stride=stride, padding=1, key=key),
        (jnp.asarray(weight.transpose(2, 3, 1, 0)), jnp.asarray(bias[:, 0, 0])),
    )
    x = jnp.asarray(rng.standard_normal((8, 8, 6)))
    scale, shift = jnp.asarray(rng.standard_normal((2, 6)))
    gn_ref = eqx.tree_at(lambda g: (g.weight, g.bias), eqx.nn.GroupNorm(3, 6), (scale, shift))
    gn = eqx.tree_at(lambda g: (g.weight, g.bias), jf.nn.GroupNorm(3, 6), (scale, shift))
    (conv, conv_ref), (gn, gn_ref) = _apply(conv, ref, gn, gn_ref, x)
    np.testing.assert_allclose(conv, conv_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gn, gn_ref, rtol=1e-8, atol=1e-10)
