"""The DDPM ancestral step: the exact transition of the reverse dynamics when the
denoiser `x0_bar = E[X_0 | X_t]` is frozen over a step (paper 002 Prop. 4.3,
eq. 4.21-4.24; Ho et al. 2020 eq. 6-7), for any Gaussian path.

Given `X_0 = x0`, the path `X_t = alpha_t X_0 + sigma_t eps` has the transition
`X_t | X_{t'} ~ N(a X_{t'}, b^2 I)` for `t' < t`, with `a = alpha_t / alpha_{t'}` and
`b^2 = sigma_t^2 - a^2 sigma_{t'}^2`, so by Bayes `X_{t'} | X_t, X_0 = x0` is Gaussian
with mean `(a sigma_{t'}^2 x + alpha_{t'} b^2 x0) / sigma_t^2` and variance
`b^2 sigma_{t'}^2 / sigma_t^2`. On the OU path these are eq. 4.23-4.24.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from ._fields import AbstractField
from ._paths import AbstractPath
from ._solve import _check_times, _prepare


def ddpm_coefficients(
    path: AbstractPath, t: Float[ArrayLike, ""], t_next: Float[ArrayLike, ""]
) -> tuple[Float[Array, ""], Float[Array, ""], Float[Array, ""]]:
    """`(c_x, c_0, var)` with `X_{t_next} | X_t = x, X_0 = x0 ~ N(c_x x + c_0 x0, var I)`
    (paper 002 eq. 4.23-4.24 on the OU path), for `t_data <= t_next < t`.

    **Arguments:**

    - `path`: any Gaussian path.
    - `t`, `t_next`: the step's times, `t_next < t` (towards the data), `t > t_data`.

    **Returns:** the mean's coefficients on `x` and on `x0`, and the variance.
    """
    if isinstance(t, (int, float)) and isinstance(t_next, (int, float)):
        if not t_next < t:
            raise ValueError(
                f"a DDPM step goes towards the data: need t_next < t, got {t_next} >= {t}."
            )
        if not path.t_data <= t_next:
            raise ValueError(f"t_next = {t_next} lies before the data end {path.t_data}.")
        if not t <= path.t_noise:
            raise ValueError(f"t = {t} lies past the noise end {path.t_noise}.")
    alpha, sigma = path.alpha(t), path.sigma(t)
    alpha_n, sigma_n = path.alpha(t_next), path.sigma(t_next)
    a = alpha / alpha_n
    b2 = sigma**2 - (a * sigma_n) ** 2
    return a * sigma_n**2 / sigma**2, alpha_n * b2 / sigma**2, b2 * sigma_n**2 / sigma**2


def ddpm_step(
    path: AbstractPath,
    x: Float[Array, " n"],
    t: Float[ArrayLike, ""],
    t_next: Float[ArrayLike, ""],
    x0_bar: Float[Array, " n"],
    noise: Float[Array, " n"],
) -> Float[Array, " n"]:
    """One DDPM step `x_{t_next} = mu + sqrt(var) noise` with the denoiser `x0_bar`
    frozen over `[t_next, t]` (paper 002 eq. 4.22-4.24).

    **Arguments:**

    - `path`, `t`, `t_next`: as for `ddpm_coefficients`.
    - `x`: the state at `t`; `x0_bar`: the denoiser's value (frozen); `noise`: a
      standard normal draw of `x`'s shape.

    **Returns:** the state at `t_next`.
    """
    c_x, c_0, var = ddpm_coefficients(path, t, t_next)
    return c_x * x + c_0 * x0_bar + jnp.sqrt(var) * noise


def sample_ddpm(
    field: AbstractField,
    z: Float[Array, " n"],
    key: PRNGKeyArray,
    *,
    steps: int = 1000,
    t_noise: float | None = None,
    t_data: float | None = None,
    times: Float[ArrayLike, " k"] | None = None,
) -> Float[Array, " n"]:
    """DDPM ancestral sampling: `steps` equal steps of `ddpm_step` from `t_noise` to
    `t_data` (or the steps of a given grid), with `x0_bar = field.denoise(x, t)` at
    the start of each step.

    Exact in law, at any step count, when the denoiser is constant (a Dirac target,
    paper 002 Theorem 2); a last step to `t = 0` returns the denoiser's value.

    **Arguments:**

    - `field`: any jaxflow field.
    - `z`: the starting point `(n,)` at `t_noise`.
    - `key`: the PRNG key; step `i` draws its noise from `fold_in(key, i)`.
    - `steps`: number of equal steps.
    - `t_noise`: start time; default `path.t_noise * (1 - 1e-3)` (as `sample_sde`).
    - `t_data`: end time (default the data end, 0).
    - `times`: instead of `steps`, `t_noise` and `t_data`, a grid increasing from
      the data end to the noise end (as for `generate`), walked backwards: fine
      steps near `t = 0`, where the denoiser changes fastest.

    **Returns:** the state at `t_data`.
    """
    path = field.path
    if times is not None:
        checked = _check_times(times, t_noise, t_data)
        t0, t1, steps = float(checked[0]), float(checked[-1]), checked.shape[0] - 1
        grid = jnp.asarray(checked[::-1].copy())  # walked backwards: the noise end first

        def time_at(i):
            return grid[i]
    else:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}.")
        t1 = path.t_noise * (1 - 1e-3) if t_noise is None else t_noise
        t0 = path.t_data if t_data is None else t_data

        def time_at(i):
            # rounding can put the last time a hair below the data end, where sigma
            # is NaN
            return jnp.maximum(t1 + (t0 - t1) * i / steps, t0)

    if isinstance(t1, (int, float)) and isinstance(t0, (int, float)) and not t0 < t1:
        raise ValueError(
            f"sample_ddpm runs towards the data: need t_data < t_noise, got {t0} and {t1}."
        )
    z = _prepare(field, z, t1, t0, "sample_ddpm", needs_score=True)

    def body(x, i):
        t, t_next = time_at(i), time_at(i + 1)
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        return ddpm_step(path, x, t, t_next, field.denoise(x, t), noise), None

    x, _ = jax.lax.scan(body, z, jnp.arange(steps))
    return eqx.error_if(
        x,
        ~jnp.all(jnp.isfinite(x)),
        "jaxflow.sample_ddpm: non-finite state; t_noise must lie where alpha > 0 and sigma > 0.",
    )
