"""Fields given by networks.

`LearnedField`: a network that predicts one of velocity, noise, data or score on
a Gaussian path, converted to the others by the identities of docs/mathematics.md §2:
`x = alpha D + sigma Zhat`, `s = -Zhat / sigma`, `v = alpha' D + sigma' Zhat`.
The parameterisations are read here (`decode`) and written here (`target`, the
regression target of the objectives), so the two stay one convention.

`InterpolantField`: the velocity of a flow learned from an arbitrary source law
(stochastic interpolants, Albergo et al. 2023; paper 003 G.5's eight-Gaussians
source), which has no score.
"""

import math
from collections.abc import Callable

import equinox as eqx
from jaxtyping import Array, ArrayLike, Float, Real

from ._fields import (
    AbstractField,
    AbstractVelocityField,
    check_output,
    check_point,
    check_result,
    known_value,
)
from ._paths import AbstractPath

PARAMETERISATIONS = ("velocity", "noise", "data", "score")


def check_parameterisation(parameterisation: str) -> None:
    if parameterisation not in PARAMETERISATIONS:
        raise ValueError(
            f"parameterisation must be one of {PARAMETERISATIONS}, got {parameterisation!r}."
        )


def target(path: AbstractPath, parameterisation: str, x, z, t):
    """What a network of this parameterisation should output at `X_t = alpha x +
    sigma z`: `alpha' x + sigma' z`, `z`, `x` or `-z / sigma` (its conditional mean
    given `X_t` is `v`, `Zhat`, `D` or `s`)."""
    if parameterisation == "velocity":
        return path.d_alpha(t) * x + path.d_sigma(t) * z
    if parameterisation == "noise":
        return z
    if parameterisation == "data":
        return x
    return -z / path.sigma(t)


def decode(path: AbstractPath, parameterisation: str, x, t, out):
    """`(D, Zhat)` from the network's output `out` at `(x, t)`: the inverse of
    `target` in conditional mean."""
    alpha = path.alpha(t).astype(x.dtype)
    sigma = path.sigma(t).astype(x.dtype)
    if parameterisation == "data":
        return out, (x - alpha * out) / sigma
    if parameterisation == "noise":
        return (x - sigma * out) / alpha, out
    if parameterisation == "score":
        return (x + sigma**2 * out) / alpha, -sigma * out
    # velocity: solve x = alpha D + sigma Z, v = alpha' D + sigma' Z for (D, Z);
    # the determinant alpha sigma' - sigma alpha' is 1 for rectified flow
    da = path.d_alpha(t).astype(x.dtype)
    ds = path.d_sigma(t).astype(x.dtype)
    det = alpha * ds - sigma * da
    return (ds * x - sigma * out) / det, (alpha * out - da * x) / det


class LearnedField(AbstractField):
    """A network `f(x, t)` read as one of `'velocity' | 'noise' | 'data' | 'score'`
    on a Gaussian path, and so a field like `AnalyticField`: every solver and
    analysis runs on it unchanged.

    **Arguments:**

    - `network`: a callable `f(x, t) -> (n,)` (an `eqx.Module` such as `jf.nn.MLP` or
      `jf.nn.UNet`; its arrays are the field's parameters).
    - `path`: the Gaussian path it was trained on.
    - `parameterisation`: what the network predicts.

    The conversions divide by `alpha` (noise, score) or `sigma` (data) or by
    `alpha sigma' - sigma alpha'` (velocity): avoid the end where the divisor
    vanishes, as the solvers' default spans do.
    """

    network: Callable
    path: AbstractPath
    parameterisation: str = eqx.field(static=True)

    def __init__(self, network, path, parameterisation):
        # unannotated so that `__check_init__`'s errors, which name the fix, are the
        # ones a wrong argument meets (also under a runtime type checker)
        self.network = network
        self.path = path
        self.parameterisation = parameterisation

    def __check_init__(self):
        if not callable(self.network):
            raise ValueError(
                f"network must be callable f(x, t), got {type(self.network).__name__}."
            )
        if not isinstance(self.path, AbstractPath):
            raise ValueError(f"LearnedField needs an AbstractPath, got {type(self.path).__name__}.")
        check_parameterisation(self.parameterisation)

    @property
    def dim(self) -> None:
        return None

    def singularity(self, t: float) -> str | None:
        """Where the conversion from the network's output divides by zero: `alpha(t)
        = 0` for noise and score networks (the noise end of rectified flow and
        cosine), `sigma(t) = 0` for data networks (the data end)."""
        alpha, sigma = known_value(self.path.alpha(t)), known_value(self.path.sigma(t))
        if self.parameterisation in ("noise", "score") and alpha == 0:
            return (
                f"a {self.parameterisation}-predicting network's data estimate "
                "divides by alpha(t) = 0"
            )
        if self.parameterisation == "data" and sigma == 0:
            return "a data-predicting network's noise estimate divides by sigma(t) = 0"
        d_sigma = known_value(self.path.d_sigma(t))
        if self.parameterisation != "velocity" and d_sigma in (math.inf, -math.inf):
            return "the velocity alpha' D + sigma' Zhat has sigma'(t) infinite"
        return None

    def _read(self, x, t):
        """The network's output and the `(D, Zhat)` it implies."""
        out = check_output("LearnedField", self.network(x, t), x)
        return (out, *decode(self.path, self.parameterisation, x, t, out))

    def denoise_and_score(self, x, t):
        _, d, z = self._read(x, t)
        return d, -z / self.path.sigma(t).astype(x.dtype)

    def velocity_and_score(self, x, t):
        out, d, z = self._read(x, t)
        # v = alpha' D + sigma' Zhat stays finite at sigma = 0 (the data end), where
        # the score -Zhat / sigma does not
        da = self.path.d_alpha(t).astype(x.dtype)
        ds = self.path.d_sigma(t).astype(x.dtype)
        v = out if self.parameterisation == "velocity" else da * d + ds * z
        return v, -z / self.path.sigma(t).astype(x.dtype)


class InterpolantField(AbstractVelocityField):
    """The velocity of a flow from an arbitrary source law to the data, learned on
    the interpolant `X_t = alpha(t) X + sigma(t) X0` with `X0` drawn from the
    source (not necessarily Gaussian): `jf.flow_matching_loss(..., source=...)`.
    The path's `alpha`, `sigma` are the interpolation coefficients: on
    `RectifiedFlow` the straight line of (OT-)CFM, on `Cosine` the
    variance-preserving stochastic interpolant (Albergo et al. 2023).

    It has a velocity, so `generate`, `invert`, the Jacobians, log-determinants
    and Lyapunov spectra run on it (start `generate` from source samples), but no
    score: the marginals are not Gaussian smoothings of the data, so `sample_sde`
    and `sample_ddpm` refuse it.

    **Arguments:**

    - `network`: a callable `f(x, t) -> (n,)` predicting the velocity.
    - `path`: the interpolation coefficients it was trained with.
    """

    network: Callable
    path: AbstractPath

    def __init__(self, network, path):
        # unannotated, as for `LearnedField`
        self.network = network
        self.path = path

    def __check_init__(self):
        if not callable(self.network):
            raise ValueError(
                f"network must be callable f(x, t), got {type(self.network).__name__}."
            )
        if not isinstance(self.path, AbstractPath):
            raise ValueError(
                f"InterpolantField needs an AbstractPath, got {type(self.path).__name__}."
            )

    @property
    def dim(self) -> None:
        return None

    def velocity_unchecked(self, x, t):
        return check_output("InterpolantField", self.network(x, t), x)

    def denoise(self, x: Float[Array, " n"], t: Real[ArrayLike, ""]) -> Float[Array, " n"]:
        """`E[X | X_t = x]`, from `x = alpha D + sigma E[X0 | X_t]` and
        `v = alpha' D + sigma' E[X0 | X_t]` (both hold for any source)."""
        x = check_point(self, x, t)
        d = decode(self.path, "velocity", x, t, self.velocity_unchecked(x, t))[0]
        return check_result(d, "denoise")
