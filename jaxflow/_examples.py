"""Laws used by the examples, benchmarks and tests, with their parameters in one place."""

import jax.numpy as jnp

from ._laws import GaussianMixture

#: Paper 000 Fig. 3 gives no parameters. We use three isotropic components with
#: variance 0.01 around a low-density centre: two of weight 1/4 above, one of
#: weight 1/2 below. The lower mode's basin in noise space is then (nearly) the
#: half-plane y < 0, so the basins meet along y = 0 through the centre of the
#: grid and the generation map stretches the central region along y (Fig. 3(b));
#: the two upper basins meet along x = 0, y > 0.
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
