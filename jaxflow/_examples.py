"""Laws used by the examples, benchmarks and tests, with their parameters in one place."""

import jax.numpy as jnp

from ._laws import GaussianMixture

#: Paper 000 Fig. 3 gives no parameters. We use three isotropic components with
#: variance 0.01 around a low-density centre: two of weight 0.3 above, one of
#: weight 0.4 below. The boundary between the lower mode's basin and the upper
#: two then crosses x = 0 near y = 0.05 in noise space (a shallow arch that falls
#: to y ~ -0.3 at the sides), so the generation map stretches the central region
#: along y (Fig. 3(b)); the two upper basins meet along x = 0 above it.
FIG3_WEIGHTS = (0.3, 0.3, 0.4)
FIG3_MEANS = ((-0.5, 0.5), (0.5, 0.5), (0.0, -0.5))
FIG3_VARIANCE = 0.01


def fig3_mixture(dtype=None) -> GaussianMixture:
    """The three-component 2-D mixture used for paper 000 Fig. 3 and Fig. 4."""
    return GaussianMixture(
        jnp.asarray(FIG3_WEIGHTS, dtype),
        jnp.asarray(FIG3_MEANS, dtype),
        jnp.full(3, FIG3_VARIANCE, dtype),
    )
