"""Flax networks as learned fields (`jf.nn.FlaxNNX`, `jf.nn.FlaxLinen`): the same
velocities, samples and Jacobians through the solver as an Equinox network with
the same weights, pytrees whose leaves are the Flax parameters, training by
`jf.train` with checkpoints, and errors that name the fix."""

import collections
import functools
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxflow as jf

pytest.importorskip("flax")
import flax.linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

N, WIDTH, TIME_DIM = 2, 16, 8
PATH = jf.RectifiedFlow()


def _input(x, t):
    return jnp.concatenate([x, jf.nn.sinusoidal_embedding(t, TIME_DIM).astype(x.dtype)])


class NNXNet(nnx.Module):
    """`jf.nn.MLP(N, width, 2, time_dim=TIME_DIM)` written in nnx."""

    def __init__(self, width, *, rngs):
        kw = dict(param_dtype=jnp.float64, rngs=rngs)
        self.l1 = nnx.Linear(N + TIME_DIM, width, **kw)
        self.l2 = nnx.Linear(width, width, **kw)
        self.l3 = nnx.Linear(width, N, **kw)

    def __call__(self, x, t):
        h = jax.nn.silu(self.l1(_input(x, t)))
        return self.l3(jax.nn.silu(self.l2(h)))


class LinenNet(nn.Module):
    """The same MLP in linen."""

    width: int

    @nn.compact
    def __call__(self, x, t):
        dense = lambda k, name: nn.Dense(k, param_dtype=jnp.float64, name=name)  # noqa: E731
        h = jax.nn.silu(dense(self.width, "l1")(_input(x, t)))
        return dense(N, "l3")(jax.nn.silu(dense(self.width, "l2")(h)))


@functools.partial(nnx.jit, static_argnums=0)
def _nnx_init(width, key):
    return NNXNet(width, rngs=nnx.Rngs(key))


def _nnx_net(width, seed):
    # initialised in one compiled program: eager initialisation compiles op by op
    return _nnx_init(width, jax.random.key(seed))


def _twin(params):
    """A `jf.nn.MLP` with the Flax weights (`{"l1": {"kernel", "bias"}, ...}`)."""
    mlp = eqx.filter_eval_shape(jf.nn.MLP, N, WIDTH, 2, time_dim=TIME_DIM, key=jax.random.key(0))
    new = [a for k in ("l1", "l2", "l3") for a in (params[k]["kernel"].T, params[k]["bias"])]
    return eqx.tree_at(lambda m: [a for L in m.layers for a in (L.weight, L.bias)], mlp, new)


@pytest.fixture(scope="module")
def networks():
    """Each wrapper with its Equinox twin."""
    net = _nnx_net(WIDTH, 0)
    linen = LinenNet(WIDTH)
    variables = jax.jit(linen.init)(jax.random.PRNGKey(1), jnp.zeros(N), 0.5)
    return {
        "nnx": (jf.nn.FlaxNNX(net), _twin(nnx.to_pure_dict(nnx.state(net)))),
        "linen": (jf.nn.FlaxLinen(linen, variables), _twin(variables["params"])),
    }


@eqx.filter_jit
def _analyse(field, zs, t):
    """Velocities, samples and generation Jacobians at a batch of points."""
    G = lambda z: jf.generate(field, z, solver="heun", steps=20)  # noqa: E731
    one = lambda z: (field.velocity(z, t), G(z), jf.jacobian(G, z))  # noqa: E731
    return jax.vmap(one)(zs)


@eqx.filter_jit
def _velocity(field, z):
    return field.velocity(z, 0.4)


@eqx.filter_jit
@eqx.filter_grad
def _loss_gradient(network, x, key):
    return jf.flow_matching_loss(network, PATH, x, key)


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_flax_network_equals_its_equinox_twin(networks, kind):
    """Velocity, `generate` and `jacobian(generate)` under jit and vmap agree with
    an Equinox MLP of the same weights to rounding, through `LearnedField` and
    `InterpolantField`; so does the flow-matching gradient w.r.t. the weights."""
    wrapper, twin = networks[kind]
    zs = jax.random.normal(jax.random.PRNGKey(2), (3, N))
    ours = _analyse(jf.LearnedField(wrapper, PATH, "velocity"), zs, 0.4)
    ref = _analyse(jf.LearnedField(twin, PATH, "velocity"), zs, 0.4)
    assert ours[2].shape == (3, N, N)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    assert not np.allclose(ours[2], np.eye(N))  # the Jacobian is not trivial
    np.testing.assert_allclose(
        _velocity(jf.InterpolantField(wrapper, PATH), zs[0]),
        _velocity(jf.InterpolantField(twin, PATH), zs[0]),
        rtol=1e-12,
        atol=1e-12,
    )
    key = jax.random.PRNGKey(3)
    grads = _loss_gradient(wrapper, zs, key)
    assert type(grads) is type(wrapper)
    flat = nnx.to_pure_dict(grads.params) if kind == "nnx" else grads.variables["params"]
    for a, b in zip(
        jax.tree.leaves(_twin(flat)), jax.tree.leaves(_loss_gradient(twin, zs, key)), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_wrappers_are_pytrees_of_the_flax_parameters(networks):
    """The array leaves are the Flax parameter arrays themselves (not copies), each
    once; vmap over a stack of wrappers evaluates each network."""
    for kind, flax_arrays in (
        ("nnx", lambda w: jax.tree.leaves(nnx.state(w.module, nnx.Param))),
        ("linen", lambda w: jax.tree.leaves(w.variables["params"])),
    ):
        wrapper, _ = networks[kind]
        leaves = jax.tree.leaves(eqx.filter(wrapper, eqx.is_array))
        assert len(leaves) == len(jax.tree.leaves(wrapper)) == 6
        assert len({id(a) for a in leaves}) == 6
        assert all(a is b for a, b in zip(leaves, flax_arrays(wrapper), strict=True))
    # weights shared by two layers are one leaf, and stay shared when merged back
    tied = _nnx_net(WIDTH, 3)
    tied.l2_again = tied.l2
    merged = jf.nn.FlaxNNX(tied).module
    assert len(jax.tree.leaves(jf.nn.FlaxNNX(tied))) == 6 and merged.l2_again is merged.l2
    # a batch of two networks: the leaves carry a leading axis
    wrapper, _ = networks["nnx"]
    other = jf.nn.FlaxNNX(_nnx_net(WIDTH, 5))
    params, static = eqx.partition(wrapper, eqx.is_array)
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, eqx.filter(other, eqx.is_array))
    x = jnp.array([0.3, -0.7])
    both = jax.jit(jax.vmap(lambda p: eqx.combine(p, static)(x, 0.2)))(stacked)
    np.testing.assert_allclose(both, jnp.stack([wrapper(x, 0.2), other(x, 0.2)]), rtol=1e-14)


def _primitives(jaxpr):
    count = collections.Counter()
    for eqn in jaxpr.eqns:
        count[eqn.primitive.name] += 1
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                count.update(_primitives(inner))
    return count


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_a_traced_call_is_the_network_arithmetic_alone(networks, kind):
    """No parameter is copied per call: the jaxpr of a call holds the same
    primitives as the Equinox twin's (no copy, no constant), and the compiled
    program's parameters are the weights."""
    wrapper, twin = networks[kind]
    call = lambda f, x: f(x, 0.4)  # noqa: E731
    x = jnp.ones(N)
    ours, ref = jax.make_jaxpr(call)(wrapper, x), jax.make_jaxpr(call)(twin, x)
    assert _primitives(ours.jaxpr) == _primitives(ref.jaxpr)
    assert "copy" not in _primitives(ours.jaxpr) and not ours.consts
    assert len(ours.jaxpr.invars) == 6 + 1


def test_train_a_flax_nnx_network_with_checkpoints(tmp_path):
    """`jf.train` trains a FlaxNNX by flow matching on two moons; the trained
    weights come back as a FlaxNNX whose module holds them, and as the checkpoint
    that `jf.load_checkpoint` reads into the untrained wrapper."""
    data = jax.jit(lambda k: jf.data.two_moons(k, 2000, dtype=jnp.float64))(jax.random.key(0))
    model = jf.nn.FlaxNNX(_nnx_net(32, 1))
    loss = lambda m, x, k: jf.flow_matching_loss(m, PATH, x, k)  # noqa: E731
    run = jf.train(
        model,
        loss,
        data,
        steps=300,
        key=jax.random.PRNGKey(2),
        optimiser=optax.adam(3e-3),
        progress=False,
        checkpoint_dir=str(tmp_path),
        checkpoint_every=300,
    )
    assert isinstance(run.model, jf.nn.FlaxNNX) and isinstance(run.ema, jf.nn.FlaxNNX)
    assert float(run.losses[-50:].mean()) < 0.8 * float(run.losses[:50].mean())
    trained = run.model.module
    assert isinstance(trained, NNXNet)
    np.testing.assert_array_equal(trained.l3.kernel[...], run.model.params["l3"]["kernel"][...])
    assert not np.allclose(trained.l3.kernel[...], model.module.l3.kernel[...])
    x = jnp.array([0.5, 0.1])
    np.testing.assert_array_equal(trained(x, 0.3), run.model(x, 0.3))
    restored, ema, step, _ = jf.load_checkpoint(str(tmp_path), model)
    assert step == 300 and isinstance(restored.module, NNXNet)
    for a, b in zip(
        jax.tree.leaves((run.model, run.ema)), jax.tree.leaves((restored, ema)), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_bad_input_raises(networks):
    (nnx_wrapper, mlp), (linen_wrapper, _) = networks["nnx"], networks["linen"]
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="nnx.Module"):
        jf.nn.FlaxNNX(mlp)
    with pytest.raises(ValueError, match="FlaxLinen"):
        jf.nn.FlaxNNX(LinenNet(4))
    with pytest.raises(ValueError, match="BatchStat at mean"):
        jf.nn.FlaxNNX(nnx.BatchNorm(3, rngs=rngs))
    with pytest.raises(ValueError, match="RngCount"):
        jf.nn.FlaxNNX(nnx.Dropout(0.1, rngs=rngs))
    jf.nn.FlaxNNX(nnx.Sequential(nnx_wrapper.module, nnx.Dropout(0.1)))  # no rngs: fine
    with pytest.raises(ValueError, match="not an array"):
        jf.nn.FlaxNNX(nnx.eval_shape(lambda: NNXNet(4, rngs=nnx.Rngs(0))))
    linen, variables = LinenNet(WIDTH), linen_wrapper.variables
    with pytest.raises(ValueError, match="FlaxNNX"):
        jf.nn.FlaxLinen(nnx_wrapper.module, variables)
    with pytest.raises(ValueError, match=r'\{"params": params\}'):
        jf.nn.FlaxLinen(linen, variables["params"])
    with pytest.raises(ValueError, match="batch_stats"):
        jf.nn.FlaxLinen(linen, dict(variables, batch_stats={"mean": jnp.zeros(3)}))
    with pytest.raises(ValueError, match="linen.Module or an apply function"):
        jf.nn.FlaxLinen(3, variables)
    # an apply function works like the module
    call = eqx.filter_jit(lambda f, x: f(x, 0.3))
    x = jnp.array([0.2, 0.4])
    np.testing.assert_array_equal(
        call(jf.nn.FlaxLinen(linen.apply, variables), x), call(linen_wrapper, x)
    )


def test_jaxflow_imports_without_flax():
    """`import jaxflow` and `jaxflow.nn` need no flax; building a wrapper names the
    extra to install."""
    code = (
        "import sys; sys.modules['flax'] = None\n"
        "import jaxflow as jf, jaxflow.nn\n"
        "for make in (lambda: jf.nn.FlaxNNX(None), lambda: jf.nn.FlaxLinen(None, {})):\n"
        "    try:\n"
        "        make()\n"
        "    except ImportError as e:\n"
        "        assert 'jaxflow[flax]' in str(e), e\n"
        "    else:\n"
        "        raise AssertionError('no ImportError')\n"
        "assert 'flax' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
