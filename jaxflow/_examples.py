"""Laws used by the examples, benchmarks and tests, with their parameters in one place."""

import jax.numpy as jnp

from ._laws import GaussianMixture

#: Paper 000 Fig. 3 gives no parameters: three isotropic components with
#: variance 0.01 around a low-density centre. The basins of the two lower modes
#: meet along x = 0 and all three meet near the origin of noise space, so the
#: generation map stretches the central region along y (the phenomenon of Fig. 3).
FIG3_WEIGHTS = (1 / 3, 1 / 3, 1 / 3)
FIG3_MEANS = ((-0.5, -0.35), (0.5, -0.35), (0.0, 0.5))
FIG3_VARIANCE = 0.01


def fig3_mixture(dtype=None) -> GaussianMixture:
    """The three-component 2-D mixture used for paper 000 Fig. 3 and Fig. 4."""
    return GaussianMixture(
        jnp.asarray(FIG3_WEIGHTS, dtype),
        jnp.asarray(FIG3_MEANS, dtype),
        jnp.full(3, FIG3_VARIANCE, dtype),
    )
