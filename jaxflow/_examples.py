"""Laws used by the examples, benchmarks and tests, with their parameters in one place."""

import itertools
import math

import jax.numpy as jnp
import numpy as np

from ._laws import GaussianMixture, GaussianNeighbours

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


def _box_mass_per_coordinate(beta: float) -> float:
    # P(U + w xi in [0, b]) for U ~ Unif[0, b], beta = b / w; see own_box_mass.
    phi = lambda s: math.exp(-0.5 * s * s) / math.sqrt(2 * math.pi)  # noqa: E731
    return math.erf(beta / math.sqrt(2)) + 2 / beta * (phi(beta) - phi(0.0))


def width_for_box_mass(n: int, side: float, alpha: float) -> float:
    """The width `w` for which a component on a cube of side `side` in `n` dimensions
    keeps mass `alpha` inside its cube (paper 000 Assumption 4.4.4 with a fixed
    `alpha`; `w` then shrinks like `side / n`, as the proof of Theorem 4.3 needs)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}.")
    if n < 1 or side <= 0:
        raise ValueError(f"need n >= 1 and side > 0, got n={n}, side={side}.")
    target = math.log(alpha) / n
    lo, hi = 1e-6, 1e12  # beta = side / w; the per-coordinate mass rises with beta
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if math.log(_box_mass_per_coordinate(mid)) < target:
            lo = mid
        else:
            hi = mid
    return side / hi


def sparse_neighbours(
    n: int, m: int = 3, side: float = 0.05, alpha: float = 0.5, seed: int = 0, dtype=None
) -> GaussianNeighbours:
    """A mixture of Gaussian neighbours meeting paper 000 Assumption 4.4: `m` (fixed)
    cubes of side `side` at random places in `[0.1, 0.9]^n`, at least one side apart,
    equal weights, widths from `width_for_box_mass` so each keeps mass `alpha` in its
    own cube whatever `n`."""
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        lower = rng.uniform(0.1, 0.9 - side, (m, n))
        gap = np.maximum(0.0, np.abs(lower[:, None] - lower[None]) - side)
        dist = np.where(np.eye(m, dtype=bool), np.inf, np.sqrt((gap**2).sum(-1)))
        if dist.min() >= side:
            break
    else:  # pragma: no cover - only for absurd m, side
        raise ValueError(f"could not place {m} separated cubes of side {side} in n={n}.")
    w = width_for_box_mass(n, side, alpha)
    return GaussianNeighbours(
        jnp.full(m, 1 / m, dtype),
        jnp.asarray(lower, dtype),
        jnp.asarray(lower + side, dtype),
        jnp.full(m, w, dtype),
    )


def tiling_neighbours(
    n: int, k: int, width: float = 0.01, side: float = 0.02, dtype=None
) -> GaussianNeighbours:
    """`k^n` small cubes centred on a regular grid of `[0, 1]^n`: density is low between
    the cubes while their basins tile noise space, so `G^{-1}(x)` of a uniform `x`
    stays moderate and the bound of paper 000 Theorem 4.1 is informative."""
    c = (np.arange(k) + 0.5) / k
    centres = np.array(list(itertools.product(c, repeat=n)))
    m = len(centres)
    return GaussianNeighbours(
        jnp.full(m, 1 / m, dtype),
        jnp.asarray(centres - side / 2, dtype),
        jnp.asarray(centres + side / 2, dtype),
        jnp.full(m, width, dtype),
    )
