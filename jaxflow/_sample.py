"""Stochastic samplers: the reverse SDE (diffrax Euler-Maruyama, and one step of
it for code that walks the chain itself) and DDPM ancestral sampling.

The DDPM ancestral step is the exact transition of the reverse dynamics when the
denoiser `x0_bar = E[X_0 | X_t]` is frozen over a step (paper 002 Prop. 4.3,
eq. 4.21-4.24; Ho et al. 2020 eq. 6-7), for any Gaussian path.

Given `X_0 = x0`, the path `X_t = alpha_t X_0 + sigma_t eps` has the transition
`X_t | X_{t'} ~ N(a X_{t'}, b^2 I)` for `t' < t`, with `a = alpha_t / alpha_{t'}` and
`b^2 = sigma_t^2 - a^2 sigma_{t'}^2`, so by Bayes `X_{t'} | X_t, X_0 = x0` is Gaussian
with mean `(a sigma_{t'}^2 x + alpha_{t'} b^2 x0) / sigma_t^2` and variance
`b^2 sigma_{t'}^2 / sigma_t^2`. On the OU path these are eq. 4.23-4.24.
"""

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Real

from ._fields import AbstractField, AbstractVelocityField
from ._misc import (
    check,
    check_finite,
    check_key,
    check_number,
    check_positive_int,
    check_same_shape,
    check_time,
    check_time_grid,
    is_concrete,
)
from ._paths import AbstractPath
from ._results import RESULTS, Outcome, classify
from ._solve import check_throw, get_solver, prepare, raise_or_outcome


def ddpm_coefficients(
    path: AbstractPath, t: Real[ArrayLike, ""], t_next: Real[ArrayLike, ""]
) -> tuple[Float[Array, ""], Float[Array, ""], Float[Array, ""]]:
    """`(c_x, c_0, var)` with `X_{t_next} | X_t = x, X_0 = x0 ~ N(c_x x + c_0 x0, var I)`
    (paper 002 eq. 4.23-4.24 on the OU path), for `t_data <= t_next <= t`
    (`t_next = t` is the step that does not move: `(1, 0, 0)`, as a padded grid
    repeats its last time).

    **Arguments:**

    - `path`: any Gaussian path.
    - `t`, `t_next`: the step's times, `t_next <= t` (towards the data), `t > t_data`.

    **Returns:** the mean's coefficients on `x` and on `x0`, and the variance.

    **Raises:** `ValueError` for a `path` that is not an `AbstractPath`, times that
    are not finite scalars, and unless `t_data <= t_next <= t <= t_noise` (under
    `jit`, an error at run time).
    """
    if not isinstance(path, AbstractPath):
        raise ValueError(
            f"ddpm_coefficients needs an AbstractPath (e.g. field.path), got {type(path).__name__}."
        )
    t = check_number("t", t)
    t_next = check_number("t_next", t_next)
    if is_concrete(t, t_next):
        if not t_next <= t:
            raise ValueError(
                f"a DDPM step goes towards the data: need t_next <= t, got {t_next} > {t}."
            )
        if not path.t_data <= t_next:
            raise ValueError(f"t_next = {t_next} lies before the data end {path.t_data}.")
        if not t <= path.t_noise:
            raise ValueError(f"t = {t} lies past the noise end {path.t_noise}.")
        return _coefficients(path, t, t_next)
    ok = (t_next <= t) & (t_next >= path.t_data) & (t <= path.t_noise)
    return eqx.error_if(
        _coefficients(path, t, t_next),
        ~ok,
        "ddpm_coefficients: need t_data <= t_next <= t <= t_noise (a DDPM step goes "
        "towards the data).",
    )


def _coefficients(path, t, t_next):
    """`ddpm_coefficients` unchecked (the sampler's inner loop)."""
    alpha, sigma = path.alpha(t), path.sigma(t)
    alpha_n, sigma_n = path.alpha(t_next), path.sigma(t_next)
    a = alpha / alpha_n
    b2 = sigma**2 - (a * sigma_n) ** 2
    return a * sigma_n**2 / sigma**2, alpha_n * b2 / sigma**2, b2 * sigma_n**2 / sigma**2


def ddpm_step(
    path: AbstractPath,
    x: Float[Array, " n"],
    t: Real[ArrayLike, ""],
    t_next: Real[ArrayLike, ""],
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

    **Raises:** as `ddpm_coefficients`, and `ValueError` when `x0_bar` or `noise`
    does not have `x`'s shape.
    """
    x = jnp.asarray(x)
    check_same_shape("ddpm_step", "x0_bar", jnp.shape(x0_bar), x)
    check_same_shape("ddpm_step", "noise", jnp.shape(noise), x)
    return _step(ddpm_coefficients(path, t, t_next), x, x0_bar, noise)


def _step(coefficients, x, x0_bar, noise):
    c_x, c_0, var = coefficients
    return c_x * x + c_0 * x0_bar + jnp.sqrt(var) * noise


def _sampling_span(field, t_noise, t_data, name, times=None):
    """`(t_noise, t_data, span_ok)` of a sampler: the defaults filled in (just short
    of the noise end, where some drifts are infinite) or the ends of a `times` grid,
    times known in Python checked (a `ValueError` naming `t_noise` / `t_data` /
    `times`), and `span_ok` False where traced times do not satisfy
    `t_data < t_noise`."""
    if not isinstance(field, AbstractVelocityField):
        raise ValueError(f"{name} needs a jaxflow field, got {type(field).__name__}.")
    path = field.path
    if times is not None:
        if not path.t_data <= times[0] < times[-1] <= path.t_noise:
            raise ValueError(
                f"times must lie in the path's range [{path.t_data}, {path.t_noise}], got "
                f"[{times[0]}, {times[-1]}]."
            )
        return float(times[-1]), float(times[0]), jnp.asarray(True)
    t1 = path.t_noise * (1 - 1e-3) if t_noise is None else check_time("t_noise", path, t_noise)
    t0 = path.t_data if t_data is None else check_time("t_data", path, t_data)
    if is_concrete(t1, t0):
        if not t0 < t1:
            raise ValueError(
                f"{name} runs towards the data: need t_data < t_noise, got {t0} and {t1}."
            )
        return t1, t0, jnp.asarray(True)
    return t1, t0, t0 < t1


def sample_ddpm(
    field: AbstractVelocityField,
    z: Float[ArrayLike, "..."],
    key: PRNGKeyArray,
    *,
    steps: int | np.integer = 1000,
    t_noise: Real[ArrayLike, ""] | None = None,
    t_data: Real[ArrayLike, ""] | None = None,
    times: Real[ArrayLike, " k"] | None = None,
    throw: bool = True,
) -> Float[Array, " n"] | Outcome:
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
    - `throw`: as for `generate`: `False` returns an `Outcome` (NaN and a
      `non_finite` result where the chain blew up) instead of raising.

    **Returns:** the state at `t_data`; with `throw=False`, an `Outcome` holding it.

    **Raises:** `ValueError` for a field without a score, `z` not one point of the
    field's dimension (or, with `throw=True`, not finite), a `key` that is not one
    PRNG key, `steps` not a positive int, times outside the path or not
    `t_data < t_noise`, or a bad `times` grid. Under `jit` the value checks raise at
    run time (with `throw=True`).
    """
    throw = check_throw(throw)
    name = "sample_ddpm"
    key = check_key("key", key)
    if times is not None:
        checked = check_time_grid(times, t_noise, t_data)
        t1, t0, span_ok = _sampling_span(field, None, None, name, times=checked)
        steps = checked.shape[0] - 1
        grid = jnp.asarray(checked[::-1].copy())  # walked backwards: the noise end first

        def time_at(i):
            return grid[i]
    else:
        steps = check_positive_int("steps", steps)
        t1, t0, span_ok = _sampling_span(field, t_noise, t_data, name)

        def time_at(i):
            # rounding can put the last time a hair below the data end, where sigma
            # is NaN
            return jnp.maximum(t1 + (t0 - t1) * i / steps, t0)

    path = field.path
    z, ok = _prepare(field, z, t1, t0, span_ok, name, throw)

    def body(x, i):
        t, t_next = time_at(i), time_at(i + 1)
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        coefficients = _coefficients(path, t, t_next)
        return _step(coefficients, x, field.denoise(x, t), noise), None

    x, _ = jax.lax.scan(body, z, jnp.arange(steps))
    return raise_or_outcome(x, classify(x, input_ok=ok), name, throw)


def _prepare(field, z, t1, t0, span_ok, name, throw):
    """`prepare` for a sampler, after a check of `z` with `throw` (a `ValueError`
    naming `z`, or an error at run time under `jit`) and of a traced span."""
    if throw:
        z = check_finite("z", jnp.asarray(z), name)
        z = check(z, ~span_ok, f"{name}: need t_data < t_noise (it runs towards the data).")
    z, ok = prepare(field, z, t1, t0, name, needs_score=True)
    return z, ok & span_ok


def sample_sde(
    field: AbstractVelocityField,
    z: Float[ArrayLike, "..."],
    key: PRNGKeyArray,
    *,
    steps: int | np.integer = 1000,
    solver=None,
    t_noise: Real[ArrayLike, ""] | None = None,
    t_data: Real[ArrayLike, ""] | None = None,
    progress_meter=None,
    throw: bool = True,
) -> Float[Array, " n"] | Outcome:
    """Integrate the reverse SDE `dx = [v - (g^2/2) s] dt + g dW` from the noise end
    to the data end (docs/mathematics.md §2; paper 002 eq. 4.1 for the OU path).

    Integrated in reversed time `tau = t_noise - t` with diffrax (Euler-Maruyama by
    default, `steps` equal steps, a `VirtualBrownianTree` driven by `key`, so the
    result is a deterministic function of `key`).

    **Arguments:**

    - `z`: the starting point `(n,)` at `t_noise`.
    - `key`: the PRNG key of the Brownian path.
    - `steps`: number of equal steps.
    - `t_noise`: start time; default `path.t_noise * (1 - 1e-3)` because the drift is
      infinite where `alpha = 0` (rectified flow and cosine at `t = 1`).
    - `t_data`: end time (default the data end, 0).
    - `progress_meter`: a diffrax progress meter; default none.
    - `throw`: as for `generate`.

    **Returns:** the state at `t_data`; with `throw=False`, an `Outcome` holding it.

    **Raises:** as `sample_ddpm` (no `times`), and for an unknown `solver`.
    """
    throw = check_throw(throw)
    name = "sample_sde"
    key = check_key("key", key)
    steps = check_positive_int("steps", steps)
    t1, t0, span_ok = _sampling_span(field, t_noise, t_data, name)
    path = field.path
    z, ok = _prepare(field, z, t1, t0, span_ok, name, throw)
    # a traced span the wrong way round is this point's invalid input, not an error
    # of the whole batch in diffrax (which needs t0 < t1)
    length = jnp.where(span_ok, t1 - t0, 1.0) if not is_concrete(span_ok) else t1 - t0

    def drift(tau, y, args):
        t = t1 - tau
        return -field.reverse_drift_unchecked(y, t)

    def diffusion(tau, y, args):
        g = jnp.sqrt(path.diffusion_squared(t1 - tau)).astype(y.dtype)
        return lx.DiagonalLinearOperator(g * jnp.ones_like(y))

    dt = length / steps
    bm = diffrax.VirtualBrownianTree(0.0, length, tol=dt / 4, shape=z.shape, key=key)
    terms = diffrax.MultiTerm(diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, bm))
    sol = diffrax.diffeqsolve(
        terms,
        diffrax.Euler() if solver is None else get_solver(solver),
        t0=0.0,
        t1=length,
        dt0=dt,
        y0=z,
        saveat=diffrax.SaveAt(t1=True),
        max_steps=steps,
        progress_meter=diffrax.NoProgressMeter() if progress_meter is None else progress_meter,
        throw=False,
    )
    x = sol.ys[0]
    return raise_or_outcome(x, classify(x, RESULTS.promote(sol.result), ok), name, throw)


def reverse_sde_step(
    field: AbstractField,
    x: Float[Array, " n"],
    t: Real[ArrayLike, ""],
    h: Real[ArrayLike, ""],
    noise: Float[Array, " n"],
    score_error: Callable[[Float[Array, " n"]], Float[Array, " n"]] | None = None,
) -> Float[Array, " n"]:
    """One Euler-Maruyama step of the reverse SDE from `t` to `t - h`:
    `x - h (f x - g^2 s) + g sqrt(h) xi` (docs/mathematics.md §2), for code that walks the
    chain itself (a Lyapunov analysis of the stochastic sampler, paper 003 G.5,
    freezes `xi` per step and differentiates the step).

    **Arguments:**

    - `field`: a field with a score (`AbstractField`).
    - `x`: the state at `t`; `t`: the time; `h`: the step, `>= 0` towards the data.
    - `noise`: a standard normal draw `xi` of `x`'s shape.
    - `score_error`: an optional `e(x)` added to the score (a model of a learned
      score's error, paper 003 G.5).

    **Returns:** the state at `t - h`.

    **Raises:** `ValueError` for a field without a score, `noise` or
    `score_error(x)` not of `x`'s shape, and unless `0 <= h <= t - t_data` (under
    `jit`, an error at run time).
    """
    name = "reverse_sde_step"
    if not isinstance(field, AbstractField):
        raise ValueError(f"{name} needs a field with a score, got {type(field).__name__}.")
    x = jnp.asarray(x)
    check_same_shape(name, "noise", jnp.shape(noise), x)
    # h = 0 is a step that does not move (a padded grid's repeated last time)
    h = check_number("h", h, 0)
    t = check_time("t", field.path, t)
    x = check(
        x,
        ~jnp.asarray(h <= t - field.path.t_data),
        f"{name}: the step h must end at t - h >= t_data, inside the path.",
    )
    error = None if score_error is None else score_error(x)
    if error is not None:
        check_same_shape(name, "score_error(x)", jnp.shape(error), x)
    g2 = field.path.diffusion_squared(t)
    drift = field.reverse_drift(x, t)
    if error is not None:
        drift = drift - g2 * error
    return x - h * drift + jnp.sqrt(g2 * h) * noise
