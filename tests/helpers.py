"""Shared tolerances, strategies and registries of laws and paths for the tests."""

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np

import jaxflow as jf

# float64 identity tolerances.
RTOL = 1e-6
ATOL = 1e-6
SOLVE = dict(rtol=1e-10, atol=1e-10)

PATHS = {
    "rectified_flow": jf.RectifiedFlow(),
    "ornstein_uhlenbeck": jf.OrnsteinUhlenbeck(4.0),
    "cosine": jf.Cosine(),
}


def random_spd(rng: np.random.Generator, n: int, cond: float = 10.0) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.exp(rng.uniform(0, np.log(cond), n)) * rng.uniform(0.2, 1.5)
    return (q * lam) @ q.T


def make_mixture(rng, n, k=3, kind="full"):
    w = rng.uniform(0.2, 1.0, k)
    w = w / w.sum()
    means = rng.uniform(-2, 2, (k, n))
    if kind == "full":
        cov = np.stack([random_spd(rng, n) * 0.3 for _ in range(k)])
    elif kind == "diag":
        cov = rng.uniform(0.05, 0.5, (k, n))
    else:
        cov = rng.uniform(0.05, 0.5, k)
    return jf.GaussianMixture(w, means, cov)


def make_neighbours(rng, n, m=3):
    w = rng.uniform(0.2, 1.0, m)
    lower = rng.uniform(-2, 1, (m, n))
    upper = lower + rng.uniform(0.05, 1.0, (m, n))
    return jf.GaussianNeighbours(w / w.sum(), lower, upper, rng.uniform(0.05, 0.3, m))


def make_empirical(rng, n, m=5):
    w = rng.uniform(0.2, 1.0, m)
    return jf.Empirical(rng.uniform(-2, 2, (m, n)), w / w.sum())


LAWS = {
    "gaussian": lambda rng, n: jf.Gaussian(rng.uniform(-1, 1, n), random_spd(rng, n)),
    "mixture_full": lambda rng, n: make_mixture(rng, n, kind="full"),
    "mixture_diag": lambda rng, n: make_mixture(rng, n, kind="diag"),
    "mixture_iso": lambda rng, n: make_mixture(rng, n, kind="iso"),
    "empirical": make_empirical,
    "neighbours": make_neighbours,
}

# Laws whose data marginal has a density (Empirical is a Dirac mixture).
DENSITY_LAWS = [k for k in LAWS if k != "empirical"]


@st.composite
def seeds(draw):
    return draw(st.integers(0, 2**31 - 1))


@eqx.filter_jit
def generate_jit(field, z, **kw):
    return jf.generate(field, z, **kw)


@eqx.filter_jit
def jacobian_of_generation(field, z):
    return jf.jacobian(lambda y: jf.generate(field, y, **SOLVE), z)


def fd_jacobian(fn, x, h=1e-5):
    """Central finite differences, an independent route to J."""
    n = x.shape[0]
    cols = [(fn(x + h * e) - fn(x - h * e)) / (2 * h) for e in jnp.eye(n, dtype=x.dtype)]
    return jnp.stack(cols, axis=1)


def fit_slope(steps, errors):
    return float(np.polyfit(np.log(np.asarray(steps)), np.log(np.asarray(errors)), 1)[0])


def key(seed=0):
    return jax.random.PRNGKey(seed)
