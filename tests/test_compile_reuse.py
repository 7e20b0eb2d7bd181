"""An eager call of a solving entry point compiles once per field structure and
shapes: a second call, at another point or with another field of the same
shapes, compiles nothing. (The ODE's right-hand side used to be a new closure per
call, which `diffrax.diffeqsolve`'s `eqx.filter_jit` took as a new static
argument: every eager solve traced and compiled again, about a second each.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxflow as jf

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_compiles = [0]


def _count(event, duration, **kwargs):
    _compiles[0] += event == BACKEND_COMPILE


jax.monitoring.register_event_duration_secs_listener(_count)

EULER = dict(solver="euler", steps=4)
ENTRY_POINTS = {
    "generate": lambda field, z: jf.generate(field, z, **EULER),
    "invert": lambda field, z: jf.invert(field, z, **EULER),
    "generate_with_jacobian": lambda field, z: jf.generate_with_jacobian(field, z, **EULER)[1],
    "log_det_generation": lambda field, z: jf.log_det_generation(
        field, z, route="divergence", **EULER
    ),
    "log_det_estimate": lambda field, z: (
        jf.log_det_estimate(field, z, key=jax.random.key(0), probes=2, **EULER).value
    ),
    "adaptive generate": lambda field, z: jf.generate(field, z, rtol=1e-6, atol=1e-6),
}


def _field(scale):
    law = jf.Gaussian(jnp.array([scale, -scale]), scale * jnp.array([[1.0, 0.3], [0.3, 0.5]]))
    return jf.AnalyticField(law, jf.RectifiedFlow())


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_second_eager_call_compiles_nothing(name):
    call = ENTRY_POINTS[name]
    first = np.asarray(call(_field(0.5), jnp.array([0.1, 0.2])))
    before = _compiles[0]
    again = np.asarray(call(_field(0.5), jnp.array([0.1, 0.2])))
    other = np.asarray(call(_field(2.0), jnp.array([0.4, -0.3])))
    assert _compiles[0] == before, f"{name}: {_compiles[0] - before} compilations on reuse"
    np.testing.assert_array_equal(again, first)
    assert not np.allclose(other, first)  # the new field and point were used


def test_eager_sharded_batch_is_one_program():
    """Eagerly, `batch_map` and `batch_generate` over a mesh compile their sharded
    solve as one program. (An eager `jax.shard_map` runs its body op by op: the
    fig3 batch took about 570 small compiles and five times the CPU time.)"""
    field = _field(0.5)
    zs = jax.random.normal(jax.random.key(1), (6, 2))
    mesh = jax.make_mesh((1,), ("batch",))
    before = _compiles[0]
    mapped = jf.batch_map(lambda z: jf.generate(field, z, **EULER), zs, mesh=mesh)
    generated = jf.batch_generate(field, zs, mesh=mesh, rtol=1e-8, atol=1e-8)
    assert _compiles[0] - before < 60, f"{_compiles[0] - before} compilations"
    # the values, as test_batching checks them on four devices
    fixed = jax.vmap(lambda z: jf.generate(field, z, **EULER))(zs)
    np.testing.assert_allclose(mapped, fixed, rtol=1e-12, atol=1e-12)
    assert generated.shape == zs.shape and np.all(np.isfinite(generated))
