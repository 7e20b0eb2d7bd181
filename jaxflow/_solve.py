"""Solving the PF-ODE with diffrax (docs/mathematics.md §4): the ODE plumbing every entry point
shares, and `generate`, `invert`, `reconstruct`.

Generation integrates the PF-ODE from the noise end to the data end, inversion
the other way (paper 000 Def. 2.1). Forward-mode differentiation (`jax.jvp`,
`jax.jacfwd`) goes through every solve (`diffrax.ForwardMode`).
"""

from typing import Literal

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Real

from ._fields import AbstractField, AbstractVelocityField
from ._misc import check_positive_int, check_time_grid, time_in_range
from ._results import RESULTS, Outcome, classify, first_failure, mask_failed

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


def get_solver(solver) -> diffrax.AbstractSolver:
    """A diffrax solver from its name, or the solver itself."""
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
    """Times known in Python lie in the path's range and differ."""
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
        steps = check_positive_int("steps", steps)
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


Direction = Literal["generate", "invert"]


def solve_ode(
    vector_field,
    y0,
    t_start,
    t_end,
    *,
    name: str,
    solver="dopri5",
    steps=None,
    rtol=None,
    atol=None,
    max_steps=DEFAULT_MAX_STEPS,
    adjoint=None,
    times=None,
    progress_meter=None,
    input_ok=None,
):
    """Integrate `dy/dt = vector_field(t, y)` from `t_start` to `t_end`.

    Shared by every ODE entry point; `name` labels its messages. Returns
    `(y(t_end), result)`: the `RESULTS` item is `successful`, the solver's own
    failure, `invalid_input` where `input_ok` is False, or `non_finite`. The
    entry point raises on it (`raise_or_outcome`) or hands it back.
    """
    solver = get_solver(solver)
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
        progress_meter=diffrax.NoProgressMeter() if progress_meter is None else progress_meter,
        throw=False,
    )
    y = jax.tree_util.tree_map(lambda a: a[0], sol.ys)
    return y, classify(y, RESULTS.promote(sol.result), input_ok)


def raise_or_outcome(value, result: RESULTS, name: str, throw: bool):
    """With `throw`, `value` with an `eqx.error_if` per cause; else an `Outcome`."""
    if not throw:
        return Outcome(value=mask_failed(value, result == RESULTS.successful), result=result)
    value = eqx.error_if(
        value,
        result == RESULTS.invalid_input,
        f"jaxflow.{name}: the input contains NaN or inf, or a time lies outside the "
        "path's range [t_data, t_noise].",
    )
    value = eqx.error_if(
        value,
        result == RESULTS.non_finite,
        f"jaxflow.{name}: the solution is not finite; the field is singular on this "
        "span (e.g. an Empirical law at t = 0) or the step is too large.",
    )
    return eqx.error_if(
        value,
        (result != RESULTS.successful)
        & (result != RESULTS.invalid_input)
        & (result != RESULTS.non_finite),
        f"jaxflow.{name}: the ODE solver did not reach the end time: it ran out of "
        "max_steps or its step size collapsed (a non-finite field makes every step "
        "fail). Raise `max_steps`, loosen `rtol`/`atol`, or use a fixed-step solver "
        "with `steps=`.",
    )


def check_throw(throw) -> bool:
    if not isinstance(throw, bool):
        raise ValueError(f"throw must be True or False, got {throw!r}.")
    return throw


def prepare(
    field, x, t_start, t_end, name: str, *, needs_score: bool = False
) -> tuple[Float[Array, " n"], Bool[Array, ""]]:
    """Check a field and one point for entry point `name`.

    Static problems (not a field, a wrong shape, a time outside the path known in
    Python) raise `ValueError`. Returns `(x, input_ok)`: `input_ok` is False where
    `x` is not finite or a traced time lies outside the path; `x` is then replaced
    by zeros, so that a batch solves its other points unharmed.
    """
    if not isinstance(field, AbstractVelocityField):
        raise ValueError(f"{name} needs a jaxflow field, got {type(field).__name__}.")
    if needs_score and not isinstance(field, AbstractField):
        raise ValueError(
            f"{name} needs a score, and a {type(field).__name__} has a velocity only (a "
            "flow learned from a non-Gaussian source); integrate its PF-ODE with "
            "jf.generate instead."
        )
    x = jnp.asarray(x)
    if x.ndim != 1:
        raise ValueError(
            f"{name} takes one point of shape (n,), got shape {x.shape}; "
            f"batch with jax.vmap(lambda x: jf.{name}(field, x))(xs)."
        )
    dim = field.dim
    if dim is not None and x.shape[0] != dim:
        raise ValueError(f"{name}: point has length {x.shape[0]}, the field's law has n = {dim}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    _check_span(field, t_start, t_end)
    ok = jnp.all(jnp.isfinite(x))
    for t in (t_start, t_end):
        if not isinstance(t, (int, float)):  # only known under jit
            ok = ok & time_in_range(field.path, t)
    return jnp.where(ok, x, jnp.zeros_like(x)), ok


def span(field: AbstractVelocityField, t_noise=None, t_data=None) -> tuple:
    """`(t_noise, t_data)`: the path's ends unless overridden."""
    return (
        field.path.t_noise if t_noise is None else t_noise,
        field.path.t_data if t_data is None else t_data,
    )


def _pf_ode(
    field, y, direction: Direction, *, t_noise, t_data, times=None, throw=True, **solve_kwargs
):
    """The PF-ODE from one end of the span to the other: towards the data for
    `direction='generate'`, towards the noise for `'invert'`."""
    throw = check_throw(throw)
    if times is not None:
        times = check_time_grid(times, t_noise, t_data)
        t_noise, t_data = float(times[-1]), float(times[0])
        if direction == "generate":
            times = times[::-1]
    t1, t0 = span(field, t_noise, t_data)
    start, end = (t1, t0) if direction == "generate" else (t0, t1)
    y, ok = prepare(field, y, start, end, direction)
    y, result = solve_ode(
        lambda t, y: field.velocity_unchecked(y, t),
        y,
        start,
        end,
        name=direction,
        times=times,
        input_ok=ok,
        **solve_kwargs,
    )
    return raise_or_outcome(y, result, direction, throw)


def generate(
    field: AbstractVelocityField,
    z: Float[ArrayLike, "..."],
    *,
    solver="dopri5",
    steps: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    t_noise: Real[ArrayLike, ""] | None = None,
    t_data: Real[ArrayLike, ""] | None = None,
    adjoint=None,
    times: Real[ArrayLike, " k"] | None = None,
    progress_meter=None,
    throw: bool = True,
) -> Float[Array, " n"] | Outcome:
    """The generation map `G(z)`: the PF-ODE from the noise end to the data end
    (paper 000 Def. 2.1).

    **Arguments:**

    - `field`: any field (`AbstractVelocityField`): analytic, learned or an
      `InterpolantField`.
    - `z`: one point `(n,)`; batch with `jax.vmap` or `jf.batch_map`.
    - `solver`: `'euler' | 'heun' | 'midpoint' | 'dopri5' | 'tsit5' | 'dopri8'` or a
      `diffrax.AbstractSolver`.
    - `steps`: fixed number of equal steps; `None` (default) for an adaptive solve.
    - `rtol, atol`: adaptive tolerances; by default `1e-8` in float64 and `1e-6` in
      float32 (see `default_tolerances`).
    - `max_steps`: bound on the number of steps; reaching it is an error.
    - `t_noise, t_data`: override the ends of the span (e.g. stop at `t_data=1e-3`
      for an `Empirical` law, whose velocity is singular at 0).
    - `adjoint`: a diffrax adjoint; default `ForwardMode()` (so `jvp`/`jacfwd` work).
    - `times`: instead of `steps`, a fixed grid, increasing from the data end to the
      noise end (`generate` walks it backwards, `invert` forwards, so a
      reconstruction uses one grid both ways); its ends are the span. Fine steps
      where the field is stiff, e.g. `np.geomspace` near `t = 0` on the OU path.
    - `progress_meter`: a diffrax progress meter, e.g.
      `diffrax.TqdmProgressMeter()` for a long solve; default none.
    - `throw`: `True` (default) raises when the solve fails; `False` returns an
      `jf.Outcome` instead, whose `value` is NaN where the point failed and whose
      `result` says why (per point under `vmap`), so one bad point costs only
      itself.

    **Returns:** `G(z)`, shape `(n,)`; with `throw=False`, an `Outcome` holding it.
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
        progress_meter=progress_meter,
        throw=throw,
    )


def invert(
    field: AbstractVelocityField,
    x: Float[ArrayLike, "..."],
    *,
    solver="dopri5",
    steps: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    t_noise: Real[ArrayLike, ""] | None = None,
    t_data: Real[ArrayLike, ""] | None = None,
    adjoint=None,
    times: Real[ArrayLike, " k"] | None = None,
    progress_meter=None,
    throw: bool = True,
) -> Float[Array, " n"] | Outcome:
    """The inversion map `G^{-1}(x)`: the PF-ODE from the data end to the noise end
    (paper 000 Def. 2.1).

    **Arguments:** as for `generate`, with `x` a data point `(n,)`.

    **Returns:** `G^{-1}(x)`, shape `(n,)`; with `throw=False`, an `Outcome`
    holding it.
    """
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
        progress_meter=progress_meter,
        throw=throw,
    )


def reconstruct(
    field: AbstractVelocityField, x: Float[ArrayLike, "..."], *, throw: bool = True, **solve_kwargs
) -> Float[Array, " n"] | Outcome:
    """`Ghat(Ghat^{-1}(x))`: invert then regenerate with the same solver settings
    (paper 000 Sec. 3.2, Algorithm 1).

    **Arguments:** as for `generate`; `solve_kwargs` go to both solves.

    **Returns:** the reconstruction `(n,)`; with `throw=False`, an `Outcome` whose
    `result` is the first failure of the two solves.
    """
    if check_throw(throw):
        return generate(field, invert(field, x, **solve_kwargs), **solve_kwargs)
    z = invert(field, x, throw=False, **solve_kwargs)
    # a failed inversion is NaN, which generate reports as invalid input; the
    # inversion's own cause comes first
    x_hat = generate(field, z.value, throw=False, **solve_kwargs)
    result = first_failure(z.result, x_hat.result)
    return Outcome(value=mask_failed(x_hat.value, result == RESULTS.successful), result=result)


def reconstruction_error(
    field: AbstractVelocityField, x: Float[ArrayLike, "..."], *, throw: bool = True, **solve_kwargs
) -> Float[Array, ""] | Outcome:
    """`R(x) = |x - Ghat(Ghat^{-1}(x))| / sqrt(n)` (paper 000 eq. 4).

    **Arguments:** as for `reconstruct`.

    **Returns:** `R(x)`; with `throw=False`, an `Outcome` holding it.
    """
    out = reconstruct(field, x, throw=throw, **solve_kwargs)
    x_hat = out if throw else out.value
    r = jnp.linalg.norm(x - x_hat) / jnp.sqrt(x.shape[-1])
    return r if throw else Outcome(value=r, result=out.result)
