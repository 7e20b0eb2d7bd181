"""The dtype policy (docs/api/solving.md): a solve returns the point's dtype; the
state, times and error control are float32 or wider; the field sees the point in
its own dtype. Checked against the Gaussian closed form `G(z) = mean + S^(1/2) z`
and, for networks, against the same network in float32."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxflow as jf

# accuracy of G against the closed form, per dtype (its resolution, plus the
# solver's default tolerance)
ACCURACY = {"float16": 5e-3, "bfloat16": 3e-2, "float32": 1e-5, "float64": 1e-7}
DTYPES = list(ACCURACY)
MEAN = np.array([0.5, -1.0])
COV = np.array([[1.0, 0.3], [0.3, 0.5]])
Z = np.array([0.7, -0.4])


def _gaussian_field(dtype=jnp.float64):
    law = jf.Gaussian(jnp.asarray(MEAN, dtype), jnp.asarray(COV, dtype))
    return jf.AnalyticField(law, jf.RectifiedFlow())


@eqx.filter_jit
def _generate_and_invert(field, z, **solve):
    """One program per dtype and solver (eager calls compile their many small
    operations one by one)."""
    x = jf.generate(field, z, **solve)
    return x, jf.invert(field, x, **solve)


def _closed_form():
    lam, v = np.linalg.eigh(COV)
    return MEAN + (v * np.sqrt(lam)) @ v.T @ Z


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("solve", [{}, dict(solver="heun", steps=200)], ids=["dopri5", "heun"])
def test_generate_and_invert_keep_the_point_dtype(dtype, solve):
    """Every float dtype generates and inverts (float16 and bfloat16 failed inside
    diffrax before), in the point's dtype, to the dtype's accuracy."""
    field = _gaussian_field()
    z = jnp.asarray(Z, dtype)
    # Heun's own error at 200 steps is ~3e-6
    atol = ACCURACY[dtype] + (1e-5 if solve else 0.0)
    x, back = _generate_and_invert(field, z, **solve)
    assert x.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(np.asarray(x, np.float64), _closed_form(), atol=atol)
    assert back.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(np.asarray(back, np.float64), Z, atol=4 * atol)


@pytest.mark.parametrize("law_dtype, point_dtype", [("float64", "float32"), ("float32", "float64")])
def test_mixed_law_and_point_dtypes(law_dtype, point_dtype):
    """A law in one dtype and a point in another: the answer has the point's dtype
    and the accuracy of the coarser of the two."""
    x = eqx.filter_jit(jf.generate)(_gaussian_field(law_dtype), jnp.asarray(Z, point_dtype))
    assert x.dtype == jnp.dtype(point_dtype)
    np.testing.assert_allclose(np.asarray(x), _closed_form(), atol=ACCURACY["float32"])


def _networks():
    net32 = jf.nn.MLP(2, 32, 2, key=jax.random.PRNGKey(0))
    to_bf16 = lambda a: a.astype(jnp.bfloat16) if eqx.is_inexact_array(a) else a  # noqa: E731
    return net32, jax.tree.map(to_bf16, net32)


@pytest.mark.parametrize("solve", [dict(solver="euler", steps=50), {}], ids=["euler", "dopri5"])
def test_bfloat16_learned_field_end_to_end(solve):
    """A bfloat16 network, as large models run: generation, inversion and a JVP
    through the solve, close to the same network in float32 (bfloat16 keeps 8
    bits: ~1e-2 relative)."""
    net32, net16 = _networks()
    fields = [jf.LearnedField(net, jf.RectifiedFlow(), "velocity") for net in (net32, net16)]
    z = jnp.asarray(Z, jnp.float32)
    u = jnp.array([1.0, 0.5], jnp.float32)

    @eqx.filter_jit  # eagerly, each of the many small operations compiles on its own
    def run(field, dtype):
        def g(y):
            return jf.generate(field, y, **solve)

        x, jx = jax.jvp(g, (z.astype(dtype),), (u.astype(dtype),))
        return x, jx, jf.invert(field, x, **solve)

    reference = run(fields[0], jnp.float32)
    for got, want in zip(run(fields[1], jnp.bfloat16), reference, strict=True):
        assert got.dtype == jnp.bfloat16
        assert np.all(np.isfinite(np.asarray(got, np.float32)))
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=5e-2 * scale)


def test_low_precision_tolerances_by_default():
    """The default tolerances follow the point's dtype; float16/bfloat16 ask for no
    more than their rounding allows (else the adaptive solve runs out of steps)."""
    assert jf.default_tolerances(jnp.float64) == (1e-8, 1e-8)
    assert jf.default_tolerances(jnp.float32) == (1e-6, 1e-6)
    rtol16, _ = jf.default_tolerances(jnp.float16)
    rtol_bf16, _ = jf.default_tolerances(jnp.bfloat16)
    assert jnp.finfo(jnp.float16).eps < rtol16 and jnp.finfo(jnp.bfloat16).eps < rtol_bf16
