"""Solving the PF-ODE and the reverse SDE with diffrax (DESIGN §4).

Generation integrates the PF-ODE from the noise end to the data end, inversion
the other way (paper 000 Def. 2.1). Forward-mode differentiation (`jax.jvp`,
`jax.jacfwd`) goes through every solve (`diffrax.ForwardMode`).
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from ._fields import AbstractField, AbstractVelocityField, check_time_in_range

_NAMED_SOLVERS = {
    "euler": diffrax.Euler,
    "heun": diffrax.Heun,
    "midpoint": diffrax.Midpoint,
    "dopri5": diffrax.Dopri5,
    "tsit5": diffrax.Tsit5,
    "dopri8": diffrax.Dopri8,
}

DEFAULT_MAX_STEPS = 4096


def default_tolerances(dtype) -> tuple[float, float]:
    """`(rtol, atol)` used when none are given.

    float64: `1e-8, 1e-8`. float32 resolves only ~1.2e-7 relative, so asking for
    more makes an adaptive solver reject steps until it runs out of them: `1e-6,
    1e-6` there (still `rtol <= 1e-6`).
    """
    if jnp.dtype(dtype) == jnp.float64:
        return 1e-8, 1e-8
    return 1e-6, 1e-6


def _get_solver(solver):
    if isinstance(solver, diffrax.AbstractSolver):
        return solver
    if isinstance(solver, str) and solver.lower() in _NAMED_SOLVERS:
        return _NAMED_SOLVERS[solver.lower()]()
    raise ValueError(
        f"unknown solver {solver!r}; use one of {sorted(_NAMED_SOLVERS)} or a "
        "diffrax.AbstractSolver instance."
    )


def _is_adaptive(solver) -> bool:
    return isinstance(solver, diffrax.AbstractAdaptiveSolver)


def _check_span(field: AbstractVelocityField, t_start, t_end):
    path = field.path
    for name, t in (("t_start", t_start), ("t_end", t_end)):
        if isinstance(t, (int, float)) and not (path.t_data <= t <= path.t_noise):
            raise ValueError(
                f"{name}={t} is outside the path's range [{path.t_data}, {path.t_noise}]."
            )
    if isinstance(t_start, (int, float)) and isinstance(t_end, (int, float)):
        if t_start == t_end:
            raise ValueError("t_start equals t_end: nothing to integrate.")


def _controller_and_dt0(solver, steps, rtol, atol, t_start, t_end, dtype, times=None):
    if times is not None:
        if steps is not None:
            raise ValueError("give either steps= (equal steps) or times= (a grid), not both.")
        return diffrax.StepTo(times), None, times.shape[0] - 1
    if steps is not None:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}.")
        return diffrax.ConstantStepSize(), (t_end - t_start) / steps, steps
    if not _is_adaptive(solver):
        raise ValueError(
            f"{type(solver).__name__} has no error estimate: give `steps=` for a "
            "fixed-step solve, or choose an adaptive solver ('dopri5', 'tsit5')."
        )
    d_rtol, d_atol = default_tolerances(dtype)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    if rtol <= 0 or atol <= 0:
        raise ValueError(f"rtol and atol must be > 0, got rtol={rtol}, atol={atol}.")
    return diffrax.PIDController(rtol=rtol, atol=atol), None, None


def solve_ode(
    vector_field,
    y0,
    t_start,
    t_end,
    *,
    solver="dopri5",
    steps=None,
    rtol=None,
    atol=None,
    max_steps=DEFAULT_MAX_STEPS,
    adjoint=None,
    what="solve",
    times=None,
):
    """Integrate `dy/dt = vector_field(t, y)` from `t_start` to `t_end`; return `y(t_end)`.

    Shared by every ODE entry point. Fails loudly (`eqx.error_if`) when the solver
    does not reach `t_end` or the result is not finite.
    """
    solver = _get_solver(solver)
    dtype = jax.tree_util.tree_leaves(y0)[0].dtype
    if times is not None:
        times = jnp.asarray(times, dtype)
    controller, dt0, fixed = _controller_and_dt0(
        solver, steps, rtol, atol, t_start, t_end, dtype, times
    )
    if fixed is not None:
        max_steps = fixed
    # diffrax promotes the state to the time's dtype: keep float32 states float32
    # when x64 is on by giving times in the state's dtype.
    t_start = jnp.asarray(t_start, dtype)
    t_end = jnp.asarray(t_end, dtype)
    dt0 = None if dt0 is None else jnp.asarray(dt0, dtype)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: vector_field(t, y)),
        solver,
        t0=t_start,
        t1=t_end,
        dt0=dt0,
        y0=y0,
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=controller,
        max_steps=max_steps,
        adjoint=diffrax.ForwardMode() if adjoint is None else adjoint,
        throw=False,
    )
    y = jax.tree_util.tree_map(lambda a: a[0], sol.ys)
    failed = sol.result != diffrax.RESULTS.successful
    y = eqx.error_if(
        y,
        failed,
        f"jaxflow.{what}: the ODE solver did not reach the end time: it ran out of "
        "max_steps or its step size collapsed (a non-finite field makes every step "
        "fail). Raise `max_steps`, loosen `rtol`/`atol`, or use a fixed-step solver "
        "with `steps=`.",
    )
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree_util.tree_leaves(y)]))
    return eqx.error_if(
        y,
        ~finite,
        f"jaxflow.{what}: the solution is not finite; the field is singular on this "
        "span (e.g. an Empirical law at t = 0) or the step is too large.",
    )


def _prepare(field, x, t_start, t_end, what, needs_score=False):
    if not isinstance(field, AbstractVelocityField):
        raise ValueError(f"{what} needs a jaxflow field, got {type(field).__name__}.")
    if needs_score and not isinstance(field, AbstractField):
        raise ValueError(
            f"{what} needs a score, and a {type(field).__name__} has a velocity only (a "
            "flow learned from a non-Gaussian source); integrate its PF-ODE with "
            "jf.generate instead."
        )
    x = jnp.asarray(x)
    if x.ndim != 1:
        raise ValueError(
            f"{what} takes one point of shape (n,), got shape {x.shape}; "
            f"batch with jax.vmap(lambda x: jf.{what}(field, x))(xs)."
        )
    dim = getattr(field, "dim", None)
    if dim is not None and x.shape[0] != dim:
        raise ValueError(f"{what}: point has length {x.shape[0]}, the field's law has n = {dim}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    _check_span(field, t_start, t_end)
    for t in (t_start, t_end):
        if not isinstance(t, (int, float)):  # only known under jit
            x = check_time_in_range(field.path, x, t, f"{what}: a time")
    return eqx.error_if(x, ~jnp.all(jnp.isfinite(x)), f"{what}: input contains NaN or inf.")


def span(field: AbstractVelocityField, t_noise=None, t_data=None) -> tuple:
    """`(t_noise, t_data)`: the path's ends unless overridden."""
    return (
        field.path.t_noise if t_noise is None else t_noise,
        field.path.t_data if t_data is None else t_data,
    )


def _check_times(times, t_noise, t_data):
    if isinstance(times, jax.core.Tracer):
        raise ValueError("times must be a concrete grid (a NumPy array), not traced under jit.")
    times = np.asarray(times, dtype=float)
    if times.ndim != 1 or times.shape[0] < 2:
        raise ValueError(f"times must be a 1-D grid of at least 2 times, got shape {times.shape}.")
    if not np.all(np.diff(times) > 0):
        raise ValueError(
            "times must increase strictly from the data end to the noise end (generate "
            "walks the grid backwards, invert forwards)."
        )
    if t_noise is not None or t_data is not None:
        raise ValueError("times= sets the span's ends; leave t_noise and t_data unset.")
    return times


def _pf_ode(field, y, what, *, t_noise, t_data, times=None, **solve_kwargs):
    """The PF-ODE from one end of the span to the other: towards the data for
    `generate`, towards the noise for `invert`."""
    if times is not None:
        times = _check_times(times, t_noise, t_data)
        t_noise, t_data = float(times[-1]), float(times[0])
        if what == "generate":
            times = times[::-1]
    t1, t0 = span(field, t_noise, t_data)
    start, end = (t1, t0) if what == "generate" else (t0, t1)
    y = _prepare(field, y, start, end, what)
    return solve_ode(
        lambda t, y: field.velocity_unchecked(y, t),
        y,
        start,
        end,
        what=what,
        times=times,
        **solve_kwargs,
    )


def generate(
    field: AbstractVelocityField,
    z: Float[Array, " n"],
    *,
    solver="dopri5",
    steps: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    t_noise: float | None = None,
    t_data: float | None = None,
    adjoint=None,
    times: Float[ArrayLike, " k"] | None = None,
) -> Float[Array, " n"]:
    """The generation map `G(z)`: the PF-ODE from the noise end to the data end
    (paper 000 Def. 2.1).

    **Arguments:**

    - `field`: any field (`AbstractVelocityField`): analytic, learned or an
      `InterpolantField`.
    - `z`: one point `(n,)`; batch with `jax.vmap`.
    - `solver`: `'euler' | 'heun' | 'midpoint' | 'dopri5' | 'tsit5' | 'dopri8'` or a
      `diffrax.AbstractSolver`.
    - `steps`: fixed number of equal steps; `None` (default) for an adaptive solve.
    - `rtol, atol`: adaptive tolerances; by default `1e-8` in float64 and `1e-6` in
      float32 (see `default_tolerances`).
    - `max_steps`: bound on the number of steps; reaching it raises an error.
    - `t_noise, t_data`: override the ends of the span (e.g. stop at `t_data=1e-3`
      for an `Empirical` law, whose velocity is singular at 0).
    - `adjoint`: a diffrax adjoint; default `ForwardMode()` (so `jvp`/`jacfwd` work).
    - `times`: instead of `steps`, a fixed grid, increasing from the data end to the
      noise end (`generate` walks it backwards, `invert` forwards, so a
      reconstruction uses one grid both ways); its ends are the span. Fine steps
      where the field is stiff, e.g. `np.geomspace` near `t = 0` on the OU path.

    **Returns:** `G(z)`, shape `(n,)`.
    """
    return _pf_ode(
        field,
        z,
        "generate",
        t_noise=t_noise,
        t_data=t_data,
        solver=solver,
        steps=steps,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        adjoint=adjoint,
        times=times,
    )


def invert(
    field: AbstractVelocityField,
    x: Float[Array, " n"],
    *,
    solver="dopri5",
    steps: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    t_noise: float | None = None,
    t_data: float | None = None,
    adjoint=None,
    times: Float[ArrayLike, " k"] | None = None,
) -> Float[Array, " n"]:
    """The inversion map `G^{-1}(x)`: the PF-ODE from the data end to the noise end
    (paper 000 Def. 2.1). Arguments as for `generate`."""
    return _pf_ode(
        field,
        x,
        "invert",
        t_noise=t_noise,
        t_data=t_data,
        solver=solver,
        steps=steps,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        adjoint=adjoint,
        times=times,
    )


def reconstruct(
    field: AbstractVelocityField, x: Float[Array, " n"], **solve_kwargs
) -> Float[Array, " n"]:
    """`Ghat(Ghat^{-1}(x))`: invert then regenerate with the same solver settings
    (paper 000 Sec. 3.2, Algorithm 1). Keywords as for `generate`."""
    return generate(field, invert(field, x, **solve_kwargs), **solve_kwargs)


def reconstruction_error(
    field: AbstractVelocityField, x: Float[Array, " n"], **solve_kwargs
) -> Float[Array, ""]:
    """`R(x) = |x - Ghat(Ghat^{-1}(x))| / sqrt(n)` (paper 000 eq. 4)."""
    x_hat = reconstruct(field, x, **solve_kwargs)
    return jnp.linalg.norm(x - x_hat) / jnp.sqrt(x.shape[-1])


def sample_sde(
    field: AbstractField,
    z: Float[Array, " n"],
    key: PRNGKeyArray,
    *,
    steps: int = 1000,
    solver=None,
    t_noise: float | None = None,
    t_data: float | None = None,
) -> Float[Array, " n"]:
    """Integrate the reverse SDE `dx = [v - (g^2/2) s] dt + g dW` from the noise end
    to the data end (DESIGN §2; paper 002 eq. 4.1 for the OU path).

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
    """
    path = field.path
    t1 = path.t_noise * (1 - 1e-3) if t_noise is None else t_noise
    t0 = path.t_data if t_data is None else t_data
    z = _prepare(field, z, t1, t0, "sample_sde", needs_score=True)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}.")
    length = t1 - t0

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
        diffrax.Euler() if solver is None else _get_solver(solver),
        t0=0.0,
        t1=length,
        dt0=dt,
        y0=z,
        saveat=diffrax.SaveAt(t1=True),
        max_steps=steps,
        throw=False,
    )
    y = sol.ys[0]
    return eqx.error_if(
        y,
        (sol.result != diffrax.RESULTS.successful) | ~jnp.all(jnp.isfinite(y)),
        "jaxflow.sample_sde: the SDE solve failed or produced non-finite values; "
        "use more steps or stop short of a singular end of the path.",
    )
