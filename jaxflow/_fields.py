"""Fields: a law (or a network) on a Gaussian path -> denoiser, noise, score, velocity.

Every field gives `denoise_and_score(x, t)` and `velocity_and_score(x, t)`; the
rest follow from the docs/mathematics.md §2 identities, written so that they stay finite at
both ends of the path wherever the mathematics is (a closed-form law derives `v`
from its finite score; a network predicting noise or velocity derives it from
`Zhat`, since its score is singular where `sigma = 0`):

- noise `Zhat = -sigma s`
- PF-ODE velocity `v = alpha' D + sigma' Zhat = alpha' D - (sigma sigma') s`
- reverse-SDE drift `v - (g^2 / 2) s`.
"""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Real

from ._laws import AbstractLaw
from ._misc import check_time_in_range
from ._paths import AbstractPath


def velocity_from_posterior(path: AbstractPath, d, s, x, t):
    """`v = alpha' D - sigma sigma' s` (docs/mathematics.md §2), finite wherever `s` is."""
    # Path coefficients follow the time's dtype; keep the state's (float32 stays float32).
    da = path.d_alpha(t).astype(x.dtype)
    ssd = path.sigma_d_sigma(t).astype(x.dtype)
    return da * d - ssd * s


def check_point(field: "AbstractVelocityField", x, t):
    """The public methods' inputs: one point `(n,)` of a floating dtype and a scalar
    time (a `ValueError`, as shapes are known under `jit` too), inside the path's
    range and finite (`eqx.error_if`). Returns `x` as a floating array."""
    x = jnp.asarray(x)
    if x.ndim != 1:
        raise ValueError(
            f"x must be one point of shape (n,), got shape {x.shape}; batch with "
            "jax.vmap(lambda x: field.velocity(x, t))(xs)."
        )
    if field.dim is not None and x.shape[0] != field.dim:
        raise ValueError(f"x has length {x.shape[0]}, the field's law has n = {field.dim}.")
    if jnp.ndim(t) != 0:
        raise ValueError(
            f"t must be a scalar time, got shape {jnp.shape(t)}; for several times use "
            "jax.vmap(lambda t: field.velocity(x, t))(ts)."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    x = check_time_in_range(field.path, x, t)
    return eqx.error_if(x, ~jnp.all(jnp.isfinite(x)), "x contains NaN or inf.")


def check_result(value, method: str):
    """A public method's answer: `eqx.error_if` where it is NaN or inf (the input
    was checked, so the field is singular there)."""
    return eqx.error_if(
        value,
        ~jnp.all(jnp.isfinite(value)),
        f"field.{method}: the result is NaN or inf at this (x, t): the field is "
        "singular there (an Empirical law's score at t = 0, a noise-predicting "
        "network where alpha(t) = 0, a score where sigma(t) = 0, the reverse drift "
        "where alpha(t) = 0); evaluate it inside the span.",
    )


def known_value(value) -> float | None:
    """`value` as a Python float where it is known outside `jit` (a path whose
    parameters are traced, e.g. under `eqx.filter_jit`, gives traced
    coefficients), else `None`."""
    return None if isinstance(value, jax.core.Tracer) else float(value)


def check_output(name: str, out, x):
    """A network's answer at `x`: an array of `x`'s shape, in `x`'s dtype."""
    out = jnp.asarray(out)
    if out.shape != x.shape:
        raise ValueError(
            f"{name}'s network returned shape {out.shape} for a point of shape "
            f"{x.shape}; a field's network maps a point (n,) and a time to (n,)."
        )
    return out.astype(x.dtype)


class AbstractVelocityField(eqx.Module):
    """A time-dependent velocity on a path's time span: all that the PF-ODE
    (`generate`, `invert`, `reconstruct`), the Jacobians, the log-determinants and
    the Lyapunov analyses need.

    Subclasses implement `velocity_unchecked`, the solvers' inner loop; the public
    `velocity` and `divergence` check `t` and `x` (`eqx.error_if`).
    `AbstractField` adds the score (Gaussian-path fields); `InterpolantField`, a
    flow learned from an arbitrary source, has a velocity only.
    """

    path: eqx.AbstractVar[AbstractPath]

    @property
    @abc.abstractmethod
    def dim(self) -> int | None:
        """The dimension `n` of the points, or `None` where the field does not know
        it before it is called (a network)."""

    @abc.abstractmethod
    def velocity_unchecked(
        self, x: Float[Array, " n"], t: Real[ArrayLike, ""]
    ) -> Float[Array, " n"]:
        """`v(x, t)` without the input checks."""

    def singularity(self, t: float) -> str | None:
        """Why the velocity is infinite or undefined at the time `t` (a Python
        float), or `None` where it is finite or not known to be singular.

        The solvers name this cause when a solve that ends at `t` fails.
        """
        return None

    def velocity(self, x: Float[Array, " n"], t: Real[ArrayLike, ""]) -> Float[Array, " n"]:
        """PF-ODE velocity `v(x, t) = alpha' D + sigma' Zhat` (paper 000 eq. 1 for RF)."""
        return check_result(self.velocity_unchecked(check_point(self, x, t), t), "velocity")

    def divergence(
        self,
        x: Float[Array, " n"],
        t: Real[ArrayLike, ""],
        key: PRNGKeyArray | None = None,
        method: str = "auto",
    ) -> Float[Array, ""]:
        """`div_x v(x, t)`.

        **Arguments:**

        - `method`: `'closed_form'` (Gaussian and Gaussian-mixture laws: about the
          cost of one evaluation of `v`), `'trace'` (exact trace of `jacfwd`, `n`
          JVPs), `'hutchinson'` (`eps^T (dv/dx) eps`, one JVP, Rademacher `eps`
          from `key`), or `'auto'`: Hutchinson when a `key` is given, else the
          closed form where the law has one, else the trace.
        """
        x = check_point(self, x, t)
        return check_result(divergence(self, x, t, key, method), "divergence")


class AbstractField(AbstractVelocityField):
    """A time-dependent field on a Gaussian path: velocity, denoiser and score.

    Subclasses implement `denoise_and_score` and `velocity_and_score`; every other
    quantity is derived.
    Public methods check `t` and `x` (`eqx.error_if`); the solvers call the
    unchecked `velocity_unchecked` in their inner loop.
    """

    @abc.abstractmethod
    def denoise_and_score(
        self, x: Float[Array, " n"], t: Real[ArrayLike, ""]
    ) -> tuple[Float[Array, " n"], Float[Array, " n"]]:
        """`(D(x, t), s(x, t))`: the posterior mean of the data and the score."""

    def velocity_unchecked(self, x, t):
        return self.velocity_and_score(x, t)[0]

    def reverse_drift_unchecked(self, x, t):
        v, s = self.velocity_and_score(x, t)
        return v - 0.5 * self.path.diffusion_squared(t).astype(x.dtype) * s

    @abc.abstractmethod
    def velocity_and_score(
        self, x: Float[Array, " n"], t: Real[ArrayLike, ""]
    ) -> tuple[Float[Array, " n"], Float[Array, " n"]]:
        """`(v(x, t), s(x, t))`, unchecked: the solvers' inner loop. A field whose
        score is singular where its velocity is not (a learned field at `sigma =
        0`) computes `v` without going through `s`."""

    def denoise(self, x: Float[Array, " n"], t: Real[ArrayLike, ""]) -> Float[Array, " n"]:
        """Denoiser `D(x, t) = E[X | X_t = x]`."""
        return check_result(self.denoise_and_score(check_point(self, x, t), t)[0], "denoise")

    def score(self, x: Float[Array, " n"], t: Real[ArrayLike, ""]) -> Float[Array, " n"]:
        """Score `s(x, t) = grad log p_t(x)`."""
        return check_result(self.denoise_and_score(check_point(self, x, t), t)[1], "score")

    def noise(self, x: Float[Array, " n"], t: Real[ArrayLike, ""]) -> Float[Array, " n"]:
        """Noise prediction `Zhat(x, t) = E[Z | X_t = x] = -sigma(t) s(x, t)`."""
        return -self.path.sigma(t) * self.score(x, t)

    def reverse_drift(self, x: Float[Array, " n"], t: Real[ArrayLike, ""]) -> Float[Array, " n"]:
        """Reverse-SDE drift `v - (g^2 / 2) s = f x - g^2 s` (docs/mathematics.md §2),
        in forward time.

        Infinite where `alpha = 0` (the noise end of rectified flow and cosine).
        """
        drift = self.reverse_drift_unchecked(check_point(self, x, t), t)
        return check_result(drift, "reverse_drift")


_DIVERGENCE_METHODS = ("auto", "closed_form", "trace", "hutchinson")


def divergence_method(field: AbstractVelocityField, key, method: str) -> str:
    """The divergence route `method` resolves to for `field` (`'auto'` chooses),
    with a `ValueError` for a route the field cannot take."""
    if method not in _DIVERGENCE_METHODS:
        raise ValueError(f"method must be one of {_DIVERGENCE_METHODS}, got {method!r}.")
    has_closed = isinstance(field, AnalyticField) and field.law.closed_form_divergence
    if method == "auto":
        return "hutchinson" if key is not None else ("closed_form" if has_closed else "trace")
    if method == "hutchinson" and key is None:
        raise ValueError("method='hutchinson' needs a PRNG key.")
    if method == "closed_form" and not has_closed:
        raise ValueError(
            "this field has no closed-form divergence (only Gaussian and GaussianMixture "
            "laws do); use method='trace' or 'hutchinson'."
        )
    return method


def divergence(field: AbstractVelocityField, x, t, key=None, method: str = "auto"):
    """`div_x v(x, t)` by the route `divergence_method` resolves to, unchecked (the
    solvers' inner loop)."""
    method = divergence_method(field, key, method)
    if method == "closed_form":
        path = field.path
        coeffs = (path.alpha(t), path.sigma(t), path.d_alpha(t), path.sigma_d_sigma(t))
        return field.law.velocity_divergence(x, *(c.astype(x.dtype) for c in coeffs))

    def v(y):
        return field.velocity_unchecked(y, t)

    if method == "trace":
        return jnp.trace(jax.jacfwd(v)(x))
    eps = jax.random.rademacher(key, x.shape, dtype=x.dtype)
    return jnp.vdot(eps, jax.jvp(v, (x,), (eps,))[1])


class AnalyticField(AbstractField):
    """The exact field of a closed-form law on a Gaussian path.

    **Arguments:**

    - `law`: an `AbstractLaw` (`Gaussian`, `GaussianMixture`, `Empirical`,
      `GaussianNeighbours`).
    - `path`: an `AbstractPath` (`RectifiedFlow`, `OrnsteinUhlenbeck`, `Cosine`).
    """

    law: AbstractLaw
    path: AbstractPath

    def __init__(self, law, path):
        # unannotated so that `__check_init__`'s error, which names the fix, is the
        # one a wrong argument meets (also under a runtime type checker)
        self.law = law
        self.path = path

    def __check_init__(self):
        if not isinstance(self.law, AbstractLaw):
            raise ValueError(f"AnalyticField needs an AbstractLaw, got {type(self.law).__name__}.")
        if not isinstance(self.path, AbstractPath):
            raise ValueError(
                "AnalyticField needs an AbstractPath (e.g. jf.RectifiedFlow()), "
                f"got {type(self.path).__name__}."
            )

    @property
    def dim(self) -> int:
        return self.law.dim

    def singularity(self, t: float) -> str | None:
        """A law without a density (`Empirical`) has an infinite score where
        `sigma(t) = 0`: the data end."""
        if not self.law.has_density and known_value(self.path.sigma(t)) == 0:
            return (
                f"a {type(self.law).__name__} law has no density, so its score "
                "(alpha D - x) / sigma^2 divides by sigma(t) = 0"
            )
        return None

    def denoise_and_score(self, x, t):
        alpha = self.path.alpha(t).astype(x.dtype)
        sigma = self.path.sigma(t).astype(x.dtype)
        return self.law.posterior(x, alpha, sigma)

    def velocity_and_score(self, x, t):
        d, s = self.denoise_and_score(x, t)
        return velocity_from_posterior(self.path, d, s, x, t), s

    def log_prob(self, x: Float[Array, " n"], t: Real[ArrayLike, ""]) -> Float[Array, ""]:
        """The marginal `log p_t(x)` of `X_t` (closed form)."""
        x = check_point(self, x, t)
        return self.law.marginal_log_prob(x, self.path.alpha(t), self.path.sigma(t))
