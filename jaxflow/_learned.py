"""A field given by a network that predicts one of velocity, noise, data or score,
converted to the others by the identities of DESIGN §2: `x = alpha D + sigma Zhat`,
`s = -Zhat / sigma`, `v = alpha' D + sigma' Zhat`."""

from collections.abc import Callable

import jax.numpy as jnp

from ._fields import AbstractField
from ._paths import AbstractPath

PARAMETERISATIONS = ("velocity", "noise", "data", "score")


def _to_denoise_and_noise(path, parameterisation, x, t, out):
    """`(D, Zhat)` from the network's output `out` at `(x, t)`."""
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

    - `network`: a callable `f(x, t) -> (n,)` (an `eqx.Module` such as `jf.MLP` or
      `jf.UNet`; its arrays are the field's parameters).
    - `path`: the Gaussian path it was trained on.
    - `parameterisation`: what the network predicts.

    The conversions divide by `alpha` (noise, score) or `sigma` (data) or by
    `alpha sigma' - sigma alpha'` (velocity): avoid the end where the divisor
    vanishes, as the solvers' default spans do.
    """

    network: Callable
    path: AbstractPath
    parameterisation: str

    def __init__(self, network: Callable, path: AbstractPath, parameterisation: str):
        if not callable(network):
            raise ValueError(f"network must be callable f(x, t), got {type(network).__name__}.")
        if not isinstance(path, AbstractPath):
            raise ValueError(f"LearnedField needs an AbstractPath, got {type(path).__name__}.")
        if parameterisation not in PARAMETERISATIONS:
            raise ValueError(
                f"parameterisation must be one of {PARAMETERISATIONS}, got {parameterisation!r}."
            )
        self.network = network
        self.path = path
        self.parameterisation = parameterisation

    def _read(self, x, t):
        """The network's output and the `(D, Zhat)` it implies."""
        out = jnp.asarray(self.network(x, t), x.dtype)
        return (out, *_to_denoise_and_noise(self.path, self.parameterisation, x, t, out))

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
