"""Regression objectives whose minimisers are the fields of a Gaussian path:
conditional flow matching (Lipman et al. 2023; Tong et al. 2024, minibatch
optimal-transport coupling) and denoising score matching with the noise
parameterisation (paper 002 eq. 4.33-4.34; Ho et al. 2020).

With `X_t = alpha X + sigma Z`, the minimiser over functions of `(x, t)` of
`E |f(X_t, t) - target|^2` is `E[target | X_t = x]`: for the targets below these
are exactly `v`, `Zhat`, `D` and `s` of docs/mathematics.md §2, so a network trained on
samples of a closed-form law converges to its `AnalyticField`. With another
source law `X0` in place of `Z` (stochastic interpolants, Albergo et al. 2023) the
velocity target's minimiser is still the interpolant's velocity
`E[alpha' X + sigma' X0 | X_t = x]`: an `InterpolantField`.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from ._learned import check_parameterisation, target
from ._misc import as_batch, check_key, check_number, check_positive_int
from ._paths import AbstractPath

COUPLINGS = ("independent", "ot")


def ot_pairing(
    x: Float[Array, "b n"],
    z: Float[Array, "b n"],
    key: PRNGKeyArray,
    *,
    iters: int | np.integer = 200,
) -> Float[Array, "b n"]:
    """Re-pair the noise `z` with the data `x` by a minibatch optimal-transport plan
    for the squared distance (Tong et al. 2024, OT-CFM): entropic OT by log-domain
    Sinkhorn with a regularisation of 1% of the mean cost, then for each data point
    a noise point drawn from its row of the plan.

    **Returns:** `z` reordered (with repetition, as the plan dictates) to pair with `x`.

    **Raises:** `ValueError` for `x`, `z` not finite batches `(b, n)` of one shape
    (a non-finite entry raises at run time under `jit`), a `key` that is not one PRNG
    key, or `iters` not a positive int.
    """
    where = "ot_pairing"
    x, z = as_batch("x", x, where), as_batch("z", z, where)
    if x.shape != z.shape:
        raise ValueError(
            f"{where}: x and z must have one shape (b, n), got {x.shape} and {z.shape}."
        )
    key = check_key("key", key)
    iters = check_positive_int("iters", iters)
    cost = jnp.sum((x[:, None, :] - z[None, :, :]) ** 2, axis=-1)
    # the regularisation; tiny where every cost is 0 (all points equal: any plan is optimal)
    eps = jnp.maximum(0.01 * jnp.mean(cost), jnp.finfo(cost.dtype).tiny)
    b = x.shape[0]
    log_mu = -jnp.log(b) * jnp.ones(b, cost.dtype)

    def body(carry, _):
        f, g = carry
        f = eps * (log_mu - jax.nn.logsumexp((g[None, :] - cost) / eps, axis=1))
        g = eps * (log_mu - jax.nn.logsumexp((f[:, None] - cost) / eps, axis=0))
        return (f, g), None

    zeros = jnp.zeros(b, cost.dtype)
    (f, g), _ = jax.lax.scan(body, (zeros, zeros), None, length=iters)
    log_plan = (f[:, None] + g[None, :] - cost) / eps
    j = jax.random.categorical(key, log_plan, axis=1)
    return z[j]


def flow_matching_loss(
    network: Callable,
    path: AbstractPath,
    x: Float[ArrayLike, "..."],
    key: PRNGKeyArray,
    *,
    parameterisation: str = "velocity",
    coupling: str = "independent",
    source: Callable[[PRNGKeyArray, int], Float[Array, "b n"]] | None = None,
    t_margin: float = 1e-3,
) -> Float[Array, ""]:
    """Mean of `|f(X_t, t) - target|^2` over a batch, `t` uniform on the path's span
    (less `t_margin * t_noise` at each end), `Z ~ N(0, I)`.

    **Arguments:**

    - `network`: `f(x, t) -> (n,)`.
    - `path`: the Gaussian path.
    - `x`: a batch of data `(b, n)`.
    - `key`: draws `t`, `Z` and the OT pairing.
    - `parameterisation`: the target: `'velocity'` (`alpha' X + sigma' Z`, flow
      matching), `'noise'` (`Z`, denoising score matching as in paper 002 eq.
      4.34), `'data'` (`X`) or `'score'` (`-Z / sigma`).
    - `coupling`: `'independent'` or `'ot'` (minibatch OT pairing of `Z` with `X`,
      OT-CFM; the pairing changes the conditional law, so only the velocity
      target keeps its meaning there).
    - `source`: `source(key, b) -> (b, n)` draws the source law `X0` of the
      interpolant `X_t = alpha X + sigma X0` (e.g. `jf.data.eight_gaussians`,
      paper 003 G.5); default the standard normal, `X0 = Z`. With another source
      only the velocity target keeps its meaning: read the network with
      `jf.InterpolantField`.
    - `t_margin`: keeps `t` off the ends, where some targets divide by zero.

    **Returns:** the scalar loss.

    **Raises:** `ValueError` for an unknown `parameterisation` or `coupling`, a
    combination of them (or a `source`) that has no meaning, a `path` that is not
    an `AbstractPath`, `x` not a finite batch `(b, n)` with `b >= 1` (under `jit`,
    a non-finite entry raises at run time), a `key` that is not one PRNG key, a
    `t_margin` outside `[0, 0.5)`, and a `network` or `source` that answers in
    another shape.
    """
    where = "flow_matching_loss"
    check_parameterisation(parameterisation)
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}.")
    if coupling == "ot" and parameterisation != "velocity":
        raise ValueError("the OT coupling is defined for the velocity target only.")
    if source is not None and parameterisation != "velocity":
        raise ValueError(
            "a non-Gaussian source leaves only the velocity target meaningful; use "
            "parameterisation='velocity'."
        )
    if not isinstance(path, AbstractPath):
        raise ValueError(f"{where} needs an AbstractPath, got {type(path).__name__}.")
    x = as_batch("x", x, where)
    key = check_key("key", key)
    t_margin = check_number("t_margin", t_margin, 0, 0.5, open_high=True)
    kt, kz, kp = jax.random.split(key, 3)
    b = x.shape[0]
    lo = path.t_data + t_margin * path.t_noise
    hi = path.t_noise * (1 - t_margin)
    t = jax.random.uniform(kt, (b,), x.dtype, lo, hi)
    if source is None:
        z = jax.random.normal(kz, x.shape, x.dtype)
    else:
        z = jnp.asarray(source(kz, b), x.dtype)
        if z.shape != x.shape:
            raise ValueError(
                f"source(key, {b}) must return the batch's shape {x.shape}, got {z.shape}."
            )
    if coupling == "ot":
        z = ot_pairing(x, z, kp)

    def one(x, z, t):
        xt = path.alpha(t) * x + path.sigma(t) * z
        out = jnp.asarray(network(xt, t))
        if out.shape != x.shape:
            raise ValueError(
                f"{where}: network(x, t) must return a point's shape {x.shape}, got {out.shape}."
            )
        err = out - target(path, parameterisation, x, z, t)
        return jnp.sum(err**2)

    return jnp.mean(jax.vmap(one)(x, z, t))


def denoising_score_matching_loss(
    network: Callable, path: AbstractPath, x: Float[ArrayLike, "..."], key: PRNGKeyArray
) -> Float[Array, ""]:
    """`E |eps_theta(alpha X + sigma Z, t) - Z|^2` (paper 002 eq. 4.33-4.34): the
    noise-parameterised objective; read the network with
    `LearnedField(network, path, 'noise')`.

    **Raises:** as `flow_matching_loss`."""
    return flow_matching_loss(network, path, x, key, parameterisation="noise")
