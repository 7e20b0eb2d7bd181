"""batch_map: chunks of vmap, equal to one vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxflow as jf


def test_batch_map_equals_vmap_with_partial_chunk():
    field = jf.AnalyticField(jf.data.fig3_mixture(jnp.float64), jf.RectifiedFlow())
    zs = jax.random.normal(jax.random.PRNGKey(2), (37, 2))

    def fn(z):
        return jf.generate_with_jacobian(field, z, rtol=1e-8, atol=1e-8)

    a = jax.jit(lambda zs: jf.batch_map(fn, zs, batch_size=8))(zs)
    b = jax.jit(jax.vmap(fn))(zs)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="batch_size"):
        jf.batch_map(fn, zs, batch_size=0)
