"""Gaussian probability paths `X_t = alpha(t) X + sigma(t) Z` (docs/mathematics.md §2).

Data sit at `t = t_data = 0`, noise at `t = t_noise` (1, or `T` for the OU path).
"""

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
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

    def _time(self, t):
        """`t` as a floating array; times known outside `jit` must lie in `[t_data,
        t_noise]`, where the coefficients are defined (traced times are checked by
        the fields' public methods, not here: the solvers' inner loop calls these)."""
        t = _as_time(t)
        if not isinstance(t, jax.core.Tracer):
            values = np.asarray(t)
            if not np.all((values >= self.t_data) & (values <= self.t_noise)):
                raise ValueError(
                    f"{type(self).__name__} is defined on [{self.t_data}, {self.t_noise}], "
                    f"got t = {values if values.ndim == 0 else values.tolist()}."
                )
        return t

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


def _check_scalar(name, value, lower=None, upper=None) -> float:
    """A path parameter as a Python float: a concrete, finite real number (a Python or
    NumPy number or a 0-d array; not a bool).

    A path's parameters are static: they fix its time span, which the solvers compare
    in Python while tracing. A value traced under `jit` or `vmap` is refused here
    rather than checked later with `eqx.error_if`, as it could not be stored.
    """
    if isinstance(value, jax.core.Tracer):
        raise ValueError(
            f"{name} must be a concrete number, got a value traced under jit/vmap: a "
            "path's parameters are static; build the path outside the transformation."
        )
    arr = np.asarray(value)
    real = np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    if arr.ndim != 0 or not real:
        raise ValueError(f"{name} must be a real number, got {value!r}.")
    value = float(arr)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}.")
    if lower is not None and not value > lower:
        raise ValueError(f"{name} must be > {lower}, got {value}.")
    if upper is not None and not value <= upper:
        raise ValueError(f"{name} must be <= {upper:g}, got {value:g}.")
    return value


class RectifiedFlow(AbstractPath):
    """Rectified flow / flow matching: `alpha = 1 - t`, `sigma = t`, `t in [0, 1]`.

    The path of paper 000 (eq. 1), Stable Diffusion 3.5 and FLUX.
    """

    t_noise: float = eqx.field(static=True, default=1.0)

    def __check_init__(self):
        # alpha = 1 - t is negative past t = 1: the span is not a parameter
        if self.t_noise != 1.0:
            raise ValueError(
                f"RectifiedFlow runs on [0, 1]; its t_noise is 1, got {self.t_noise!r}. "
                "Stop a solve early with generate(..., t_noise=...) instead."
            )

    def alpha(self, t):
        return 1.0 - self._time(t)

    def sigma(self, t):
        return self._time(t)

    def d_alpha(self, t):
        return -jnp.ones_like(self._time(t))

    def d_sigma(self, t):
        return jnp.ones_like(self._time(t))

    def sigma_d_sigma(self, t):
        return self._time(t)


class OrnsteinUhlenbeck(AbstractPath):
    """Variance-preserving Ornstein-Uhlenbeck path on `[0, T]`.

    `alpha = exp(-t)`, `sigma = sqrt(1 - exp(-2t))` (paper 002, eq. 2.1 with unit
    rate). The marginal at `T` is only approximately `N(0, I)`; the analysis code
    uses the exact marginal wherever an identity needs it.

    **Arguments:**

    - `T`: the horizon, `> 0` (default 5, where `exp(-T) ~ 6.7e-3`).
    """

    t_noise: float = eqx.field(static=True)

    def __init__(self, T: Real[ArrayLike, ""] = 5.0):
        self.t_noise = _check_scalar("OrnsteinUhlenbeck T", T, lower=0.0)

    def alpha(self, t):
        return jnp.exp(-self._time(t))

    def sigma(self, t):
        return jnp.sqrt(-jnp.expm1(-2.0 * self._time(t)))

    def d_alpha(self, t):
        return -jnp.exp(-self._time(t))

    def d_sigma(self, t):
        return jnp.exp(-2.0 * self._time(t)) / self.sigma(t)

    def sigma_d_sigma(self, t):
        return jnp.exp(-2.0 * self._time(t))

    def drift_coefficient(self, t):
        # exactly -1: alpha'/alpha is 0/0 once exp(-t) underflows (t > 87 in float32)
        return -jnp.ones_like(self._time(t))


class Cosine(AbstractPath):
    """Cosine schedule (Nichol & Dhariwal; paper 003 appendix G.1) on `[0, 1]`.

    `alpha(t) = cos(theta(t)) / cos(theta(0))`, `theta(t) = (pi/2)(t + d)/(1 + d)`,
    so `alpha^2 = abar(t) = f(t)/f(0)` with `f(t) = cos^2 theta(t)`, and
    `sigma = sqrt(1 - alpha^2)`.

    **Arguments:**

    - `offset`: the small offset `d >= 0` (default 0.008), at most `1e6` (beyond it
      the schedule is its `d -> inf` limit, `alpha = 1 - t`, to `1e-12`). With `d = 0`,
      `alpha = cos(pi t / 2)`, `sigma = sin(pi t / 2)`: the variance-preserving
      stochastic interpolant (Albergo et al. 2023), whose `sigma'` stays finite at
      `t = 0` (it is `~ 1 / sqrt(t)` for `d > 0`).
    """

    offset: float = eqx.field(static=True)
    t_noise: float = eqx.field(static=True, default=1.0)

    def __init__(self, offset: Real[ArrayLike, ""] = 0.008):
        offset = _check_scalar("Cosine offset", offset, upper=1e6)
        if offset < 0:
            raise ValueError(f"Cosine offset must be >= 0, got {offset}.")
        self.offset = offset

    @property
    def _k(self) -> float:
        """`k = (pi/2) / (1 + d)`: `theta(t) = pi/2 - k (1 - t)` and `theta(0) = pi/2 - k`.

        The coefficients below are written with angles that are multiples of `k`,
        formed without cancelling: `cos(theta(1))`, the cosine of `pi/2` rounded, is
        `-4e-8` in float32 (a negative `alpha(1)`), and `theta(t) - theta(0)` loses the
        digits of small `t` or of a large `d`.
        """
        return 0.5 * math.pi / (1.0 + self.offset)

    def alpha(self, t):
        k = self._k
        return jnp.sin(k * (1.0 - self._time(t))) / math.sin(k)

    def sigma(self, t):
        # sigma^2 sin^2 k = cos^2 theta(0) - cos^2 theta(t) = sin(k t) sin(k (t + 2d)),
        # and sin(k (t + 2d)) = sin(k (2 - t)): take the angle that stays away from pi.
        k, t = self._k, self._time(t)
        second = k * (t + 2.0 * self.offset) if self.offset < 1.0 else k * (2.0 - t)
        return jnp.sqrt(jnp.maximum(jnp.sin(k * t) * jnp.sin(second), 0.0)) / math.sin(k)

    def d_alpha(self, t):
        k = self._k
        return -k * jnp.cos(k * (1.0 - self._time(t))) / math.sin(k)

    def d_sigma(self, t):
        if self.offset == 0.0:
            # sigma = sin(k t): the quotient below is 0 / 0 at t = 0
            return self._k * jnp.cos(self._k * self._time(t))
        return self.sigma_d_sigma(t) / self.sigma(t)

    def sigma_d_sigma(self, t):
        # sigma^2 = 1 - alpha^2, so sigma sigma' = -alpha alpha'.
        return -self.alpha(t) * self.d_alpha(t)
