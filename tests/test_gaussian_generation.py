"""Gaussian data under rectified flow: `G(z) = mu + S^(1/2) z` exactly (DESIGN §3)."""

import jax.numpy as jnp
import numpy as np
from helpers import SOLVE, generate_jit, jacobian_of_generation, random_spd
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxflow as jf


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), cond=st.floats(1.0, 50.0))
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

    def gen(y):
        return jf.generate(field, y, **SOLVE)

    np.testing.assert_allclose(
        jf.singular_values(gen, z), np.sqrt(np.linalg.eigvalsh(cov))[::-1], rtol=1e-6
    )
    np.testing.assert_allclose(
        jf.geometric_mean_singular_value(gen, z), np.linalg.det(cov) ** (1 / 8), rtol=1e-6
    )
    np.testing.assert_allclose(
        jf.log_abs_det_jacobian(gen, z), 0.5 * np.linalg.slogdet(cov)[1], rtol=1e-6
    )
    x, jac = jf.generate_with_jacobian(field, z, **SOLVE)
    np.testing.assert_allclose(jac, law.sqrt_covariance(), rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(x, law.sqrt_covariance() @ z, rtol=1e-7, atol=1e-8)


def test_generate_then_invert_is_identity_on_every_path():
    rng = np.random.default_rng(4)
    law = jf.Gaussian(rng.uniform(-1, 1, 3), random_spd(rng, 3))
    z = jnp.asarray(rng.standard_normal(3))
    for path in (jf.RectifiedFlow(), jf.OrnsteinUhlenbeck(5.0), jf.Cosine()):
        field = jf.AnalyticField(law, path)
        np.testing.assert_allclose(
            jf.invert(field, jf.generate(field, z, **SOLVE), **SOLVE), z, rtol=1e-7, atol=1e-7
        )
