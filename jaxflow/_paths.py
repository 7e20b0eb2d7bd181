"""Gaussian probability paths `X_t = alpha(t) X + sigma(t) Z` (docs/mathematics.md §2).

Data sit at `t = t_data = 0`, noise at `t = t_noise` (1, or `T` for the OU path).
"""

import abc
import math

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Real


class AbstractPath(eqx.Module):
    """A Gaussian probability path `X_t = alpha(t) X + sigma(t) Z`, `Z ~ N(0, I)`.

    Subclasses give `alpha`, `sigma`, their time derivatives and the product
    `sigma * sigma'`, which stays finite where `sigma'` alone does not (the cosine
    path at `t = 0`); the PF-ODE velocity is written with that product.

    The coefficients act elementwise: `t` is a time (a Python number or a 0-d
    array) or an array of times, and the result has `t`'s shape.
    """

    t_noise: eqx.AbstractVar[float]

    @property
    def t_data(self) -> float:
        """The data end of the path (always 0)."""
        return 0.0

    @abc.abstractmethod
    def alpha(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        """Signal coefficient `alpha(t)`."""

    @abc.abstractmethod
    def sigma(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        """Noise coefficient `sigma(t)`."""

    @abc.abstractmethod
    def d_alpha(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        """`d alpha / dt`."""

    @abc.abstractmethod
    def d_sigma(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        """`d sigma / dt` (may be infinite at an end of the path)."""

    @abc.abstractmethod
    def sigma_d_sigma(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        """`sigma * d sigma / dt = (1/2) d sigma^2 / dt`, finite on the whole path."""

    def drift_coefficient(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        """`f(t) = alpha'/alpha` of the forward SDE `dX = f X dt + g dW`
        (docs/mathematics.md §2)."""
        return self.d_alpha(t) / self.alpha(t)

    def diffusion_squared(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        """`g(t)^2 = 2 sigma sigma' - 2 f sigma^2` of the forward SDE (docs/mathematics.md §2).

        Written as `2 sigma sigma' - 2 alpha' sigma^2 / alpha`; infinite where
        `alpha = 0` (the noise end of the rectified-flow and cosine paths).
        """
        sigma = self.sigma(t)
        return 2 * self.sigma_d_sigma(t) - 2 * self.drift_coefficient(t) * sigma**2


def _as_time(t):
    """`t` as an array of a floating dtype (an integer time becomes the default float)."""
    t = jnp.asarray(t)
    return t if jnp.issubdtype(t.dtype, jnp.floating) else t.astype(float)


def _check_scalar(name, value, lower=None, upper=None):
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite Python number, got {value!r}.")
    if lower is not None and not value > lower:
        raise ValueError(f"{name} must be > {lower}, got {value}.")
    if upper is not None and not value < upper:
        raise ValueError(f"{name} must be < {upper}, got {value}.")


class RectifiedFlow(AbstractPath):
    """Rectified flow / flow matching: `alpha = 1 - t`, `sigma = t`, `t in [0, 1]`.

    The path of paper 000 (eq. 1), Stable Diffusion 3.5 and FLUX.
    """

    t_noise: float = eqx.field(static=True, default=1.0)

    def alpha(self, t):
        return 1.0 - jnp.asarray(t)

    def sigma(self, t):
        return _as_time(t)

    def d_alpha(self, t):
        return -jnp.ones_like(jnp.asarray(t, dtype=float))

    def d_sigma(self, t):
        return jnp.ones_like(jnp.asarray(t, dtype=float))

    def sigma_d_sigma(self, t):
        return _as_time(t)


class OrnsteinUhlenbeck(AbstractPath):
    """Variance-preserving Ornstein-Uhlenbeck path on `[0, T]`.

    `alpha = exp(-t)`, `sigma = sqrt(1 - exp(-2t))` (paper 002, eq. 2.1 with unit
    rate). The marginal at `T` is only approximately `N(0, I)`; the analysis code
    uses the exact marginal wherever an identity needs it.

    **Arguments:**

    - `T`: the horizon, `> 0` (default 5, where `exp(-T) ~ 6.7e-3`).
    """

    t_noise: float = eqx.field(static=True)

    def __init__(self, T: float | int = 5.0):
        _check_scalar("OrnsteinUhlenbeck T", T, lower=0.0)
        self.t_noise = float(T)

    def alpha(self, t):
        return jnp.exp(-jnp.asarray(t))

    def sigma(self, t):
        return jnp.sqrt(-jnp.expm1(-2.0 * jnp.asarray(t)))

    def d_alpha(self, t):
        return -jnp.exp(-jnp.asarray(t))

    def d_sigma(self, t):
        return jnp.exp(-2.0 * jnp.asarray(t)) / self.sigma(t)

    def sigma_d_sigma(self, t):
        return jnp.exp(-2.0 * jnp.asarray(t))


class Cosine(AbstractPath):
    """Cosine schedule (Nichol & Dhariwal; paper 003 appendix G.1) on `[0, 1]`.

    `alpha(t) = cos(theta(t)) / cos(theta(0))`, `theta(t) = (pi/2)(t + d)/(1 + d)`,
    so `alpha^2 = abar(t) = f(t)/f(0)` with `f(t) = cos^2 theta(t)`, and
    `sigma = sqrt(1 - alpha^2)`.

    **Arguments:**

    - `offset`: the small offset `d >= 0` (default 0.008). With `d = 0`,
      `alpha = cos(pi t / 2)`, `sigma = sin(pi t / 2)`: the variance-preserving
      stochastic interpolant (Albergo et al. 2023), whose `sigma'` stays finite at
      `t = 0` (it is `~ 1 / sqrt(t)` for `d > 0`).
    """

    offset: float = eqx.field(static=True)
    t_noise: float = eqx.field(static=True, default=1.0)

    def __init__(self, offset: float | int = 0.008):
        _check_scalar("Cosine offset", offset)
        if offset < 0:
            raise ValueError(f"Cosine offset must be >= 0, got {offset}.")
        self.offset = float(offset)

    def _theta(self, t):
        return 0.5 * jnp.pi * (jnp.asarray(t) + self.offset) / (1.0 + self.offset)

    def alpha(self, t):
        return jnp.cos(self._theta(t)) / math.cos(0.5 * math.pi * self.offset / (1 + self.offset))

    def sigma(self, t):
        # 1 - alpha^2 loses all digits near t = 0; write it as a difference of sines.
        c0 = math.cos(0.5 * math.pi * self.offset / (1 + self.offset))
        th = self._theta(t)
        th0 = 0.5 * math.pi * self.offset / (1 + self.offset)
        # cos^2 th0 - cos^2 th = sin(th - th0) sin(th + th0)
        return jnp.sqrt(jnp.maximum(jnp.sin(th - th0) * jnp.sin(th + th0), 0.0)) / c0

    def d_alpha(self, t):
        c0 = math.cos(0.5 * math.pi * self.offset / (1 + self.offset))
        dtheta = 0.5 * math.pi / (1.0 + self.offset)
        return -jnp.sin(self._theta(t)) * dtheta / c0

    def d_sigma(self, t):
        if self.offset == 0.0:
            # sigma = sin(theta): the quotient below is 0 / 0 at t = 0
            return 0.5 * jnp.pi * jnp.cos(self._theta(t))
        return self.sigma_d_sigma(t) / self.sigma(t)

    def sigma_d_sigma(self, t):
        # sigma^2 = 1 - alpha^2, so sigma sigma' = -alpha alpha'.
        return -self.alpha(t) * self.d_alpha(t)
