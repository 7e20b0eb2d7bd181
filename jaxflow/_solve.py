"""Solving the PF-ODE with diffrax (docs/mathematics.md §4): the ODE plumbing every entry point
shares, and `generate`, `invert`, `reconstruct`.

Generation integrates the PF-ODE from the noise end to the data end, inversion
the other way (paper 000 Def. 2.1). Forward-mode differentiation (`jax.jvp`,
`jax.jacfwd`) goes through every solve (`diffrax.ForwardMode`); reverse mode needs
`adjoint=diffrax.RecursiveCheckpointAdjoint()`, and without it raises saying so.
"""

import inspect
import math
from typing import Literal

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Real

from ._fields import AbstractField, AbstractVelocityField
from ._misc import as_array, check_bool, check_positive_int, check_time_grid, time_in_range
from ._results import RESULTS, Outcome, all_finite, classify, first_failure, mask_failed

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
    """`(rtol, atol)` used when none are given, by the dtype of the point.

    float64: `1e-8, 1e-8`. float32 resolves only ~1.2e-7 relative, so asking for
    more makes an adaptive solver reject steps until it runs out of them: `1e-6,
    1e-6` there (still `rtol <= 1e-6`). float16 and bfloat16 points are
    integrated in float32, but the field sees them rounded to 11 or 8 bits, so its
    values carry errors of ~5e-4 or ~4e-3 relative: `1e-3` and `1e-2` there.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64:
        return 1e-8, 1e-8
    if dtype == jnp.float16:
        return 1e-3, 1e-3
    if dtype == jnp.bfloat16:
        return 1e-2, 1e-2
    return 1e-6, 1e-6


def state_dtype(dtype):
    """The dtype a point of `dtype` is integrated in: float32 or wider.

    A bfloat16 or float16 state would lose each step's increment to rounding
    (`x + dt v` with `dt v` below half an ulp of `x` does not move `x`), so the
    state, the times and the error control are float32 there, as diffusers'
    schedulers do; the field still sees the point in its own dtype.
    """
    return jnp.promote_types(dtype, jnp.float32)


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


def concrete_time(name: str, t) -> float | None:
    """A time as a Python float where its value is known outside `jit` (a Python or
    NumPy number, a concrete array), else `None`; a time that is not a scalar
    raises."""
    if t is None:
        return None
    if jnp.ndim(t) != 0:
        raise ValueError(f"{name} must be a scalar time, got shape {jnp.shape(t)}.")
    if isinstance(t, jax.core.Tracer):
        return None
    return float(t)


def _check_span(field: AbstractVelocityField, t_start, t_end):
    """Times known in Python lie in the path's range and differ."""
    path = field.path
    known = {}
    for name, t in (("t_start", t_start), ("t_end", t_end)):
        value = concrete_time(name, t)
        if value is not None and not (path.t_data <= value <= path.t_noise):
            raise ValueError(
                f"{name}={value} is outside the path's range [{path.t_data}, "
                f"{path.t_noise}]; pass a time inside it."
            )
        known[name] = value
    if known["t_start"] is not None and known["t_start"] == known["t_end"]:
        raise ValueError("t_start equals t_end: nothing to integrate.")


def _check_tolerance(name: str, value):
    """`rtol`/`atol`: finite and > 0 (a `ValueError` when known, else
    `eqx.error_if`)."""
    message = f"{name} must be a finite number > 0, got {{}}; e.g. {name}=1e-6."
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number, jax.Array)):
        raise ValueError(message.format(repr(value)))
    if jnp.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}.")
    if not isinstance(value, jax.core.Tracer):
        if not (math.isfinite(float(value)) and float(value) > 0):
            raise ValueError(message.format(value))
        return value
    return eqx.error_if(value, ~(jnp.isfinite(value) & (value > 0)), message.format("a bad value"))


def check_max_steps(max_steps) -> int:
    """`max_steps`: a positive int. `None` (diffrax's unbounded solve) is refused:
    an adaptive solve whose field is not finite shrinks its step forever."""
    if max_steps is None:
        raise ValueError(
            "max_steps=None would let a failing solve (a field that is NaN or inf "
            "somewhere) run forever; pass a bound, e.g. max_steps=100_000."
        )
    return check_positive_int("max_steps", max_steps)


def _controller_and_dt0(solver, steps, rtol, atol, t_start, t_end, dtype, times=None):
    if times is not None:
        if steps is not None:
            raise ValueError("give either steps= (equal steps) or times= (a grid), not both.")
        if rtol is not None or atol is not None:
            raise ValueError("rtol/atol set an adaptive solve; a times= grid is fixed.")
        return diffrax.StepTo(times), None, times.shape[0] - 1
    if steps is not None:
        steps = check_positive_int("steps", steps)
        if rtol is not None or atol is not None:
            raise ValueError(
                "rtol/atol set an adaptive solve; with steps= the steps are fixed. "
                "Give one or the other."
            )
        return diffrax.ConstantStepSize(), (t_end - t_start) / steps, steps
    return adaptive_controller(solver, rtol, atol, dtype), None, None


def adaptive_controller(
    solver, rtol, atol, dtype, norm=None, fixed_step: str | None = None
) -> diffrax.PIDController:
    """The step-size controller of an adaptive solve of points of `dtype`: the
    tolerances checked, `default_tolerances` where not given; `norm` as
    `diffrax.PIDController`'s (RMS by default). `fixed_step` is the advice for a
    solver without an error estimate, where the entry point's is not `steps=`."""
    if not _is_adaptive(solver):
        if fixed_step is None:
            fixed_step = "give `steps=` for a fixed-step solve"
        raise ValueError(
            f"{type(solver).__name__} has no error estimate: {fixed_step}, or choose an "
            "adaptive solver ('dopri5', 'tsit5', 'dopri8')."
        )
    d_rtol, d_atol = default_tolerances(dtype)
    rtol = d_rtol if rtol is None else _check_tolerance("rtol", rtol)
    atol = d_atol if atol is None else _check_tolerance("atol", atol)
    if norm is None:
        return diffrax.PIDController(rtol=rtol, atol=atol)
    return diffrax.PIDController(rtol=rtol, atol=atol, norm=norm)


Direction = Literal["generate", "invert"]


def singular_end(field: AbstractVelocityField, t_start, t_end) -> str | None:
    """What to say when a solve from `t_start` to `t_end` fails and one of its ends
    (known in Python) is a time where `field` is singular; `None` otherwise.

    A solver that never evaluates the field at that end (Euler generating towards
    it) may still succeed, so the span is not refused up front.
    """
    path = field.path
    for t in (t_start, t_end):
        value = concrete_time("t", t)
        reason = None if value is None else field.singularity(value)
        if reason is None:
            continue
        fix = (
            f"t_data={1e-3 * path.t_noise:g}"
            if value == path.t_data
            else f"t_noise={path.t_noise * (1 - 1e-3):g}"
        )
        return (
            f"the field is singular at t = {value:g} ({reason}); stop short of that "
            f"end, e.g. {fix}."
        )
    return None


def cast_like(tree, like):
    """`tree` leaf by leaf in the dtypes of `like`'s leaves."""
    return jax.tree_util.tree_map(lambda a, b: a.astype(b.dtype), tree, like)


def _term_in_state_dtypes(vector_field, compute, y0, t, y, args):
    return cast_like(vector_field(t, cast_like(y, compute)), y0)


def _velocity(field, t, y):
    return field.velocity_unchecked(y, t)


def velocity_term(field: AbstractVelocityField) -> jax.tree_util.Partial:
    """`(t, y) -> v(y, t)` as a pytree (`jax.tree_util.Partial` of a module-level
    function), not a closure: `diffrax.diffeqsolve` is an `eqx.filter_jit`, which
    keys its cache on the static part of its arguments, and a new closure each
    call made every eager solve trace and compile again (about a second each)."""
    return jax.tree_util.Partial(_velocity, field)


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
    singular: str | None = None,
):
    """Integrate `dy/dt = vector_field(t, y)` from `t_start` to `t_end`.

    Shared by every ODE entry point; `name` labels its messages. Returns
    `(y(t_end), result)`: the `RESULTS` item is `successful`, `invalid_input`
    where `input_ok` is False, `singular_field` for any failure when the span
    ends where the field is singular (`singular`, from `singular_end`),
    `field_non_finite` when the field is not finite at the start, the solver's
    own failure, or `non_finite`. The entry point raises on it
    (`raise_or_outcome`) or hands it back.

    dtypes (docs/api/solving.md): `y(t_end)` has `y0`'s dtypes; the state, the
    times and the error control are in `state_dtype` (float32 or wider), and
    `vector_field` sees the state in `y0`'s dtypes and may answer in any. Pass
    it as a pytree (`velocity_term`, or a `jax.tree_util.Partial` of a
    module-level function), not a closure, so that an eager solve reuses the
    program compiled for the same shapes.
    """
    compute = y0
    y0 = jax.tree_util.tree_map(lambda a: a.astype(state_dtype(a.dtype)), y0)
    dtype = jax.tree_util.tree_leaves(y0)[0].dtype
    tol_dtype = jax.tree_util.tree_leaves(compute)[0].dtype
    if times is not None:
        times = jnp.asarray(times, dtype)
    solver, controller, dt0, max_steps = _solver_settings(
        solver, steps, rtol, atol, max_steps, t_start, t_end, tol_dtype, times
    )
    adjoint = diffrax.ForwardMode() if adjoint is None else adjoint
    # diffrax promotes the state to the time's dtype: keep float32 states float32
    # when x64 is on by giving times in the state's dtype.
    t_start = jnp.asarray(t_start, dtype)
    t_end = jnp.asarray(t_end, dtype)
    dt0 = None if dt0 is None else jnp.asarray(dt0, dtype)

    term = jax.tree_util.Partial(_term_in_state_dtypes, vector_field, compute, y0)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(term),
        solver,
        t0=t_start,
        t1=t_end,
        dt0=dt0,
        y0=y0,
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=controller,
        max_steps=max_steps,
        adjoint=adjoint,
        progress_meter=diffrax.NoProgressMeter() if progress_meter is None else progress_meter,
        throw=False,
    )
    y = cast_like(jax.tree_util.tree_map(lambda a: a[0], sol.ys), compute)
    if isinstance(adjoint, diffrax.ForwardMode):
        y = _forward_only(y, name)
    result = classify(y, RESULTS.promote(sol.result), input_ok)
    failed = (result != RESULTS.successful) & (result != RESULTS.invalid_input)
    if singular is not None:
        return y, RESULTS.where(failed, RESULTS.singular_field, result)
    # one more evaluation tells a field that is NaN or inf where the solve starts
    # from a solve that ran out of steps
    start_ok = all_finite(term(t_start, y0, None))
    return y, RESULTS.where(failed & ~start_ok, RESULTS.field_non_finite, result)


def _solver_settings(solver, steps, rtol, atol, max_steps, t_start, t_end, dtype, times):
    """`(solver, controller, dt0, max_steps)` of a solve, its settings checked: the
    solver by name, `max_steps`, and `steps`, `times` and the tolerances against
    each other and the solver."""
    solver = get_solver(solver)
    max_steps = check_max_steps(max_steps)
    controller, dt0, fixed = _controller_and_dt0(
        solver, steps, rtol, atol, t_start, t_end, dtype, times
    )
    return solver, controller, dt0, max_steps if fixed is None else fixed


def _forward_only(y, name: str):
    """`y`, the result of a solve under `diffrax.ForwardMode`, marked so that
    reverse-mode differentiation through it raises advice.

    `ForwardMode` runs the solve in a `lax.while_loop`: it differentiates forwards
    (`jax.jvp`, `jax.jacfwd`) at the cost of one plain solve, but a while loop
    cannot be transposed, so `jax.grad` fails with JAX's "Reverse-mode
    differentiation does not work for lax.while_loop", which names neither the
    solve nor the fix. The mark is the identity, forwards and in JVPs (no
    arithmetic, no change to the solve); transposing it, which reverse mode does
    before it reaches the loop, raises this `RuntimeError` instead
    (`equinox.internal.nondifferentiable_backward`, as diffrax marks a solve's
    internal state)."""
    advice = f"pass adjoint=diffrax.RecursiveCheckpointAdjoint() to jf.{name}"
    if name in ("generate", "invert"):
        inverse = ", inverse=True" if name == "invert" else ""
        advice += (
            "; for the matrix-free analyses (jf.top_singular_values, "
            "jf.smallest_singular_values, ...) pass the map as "
            f"jf.generation_map(field{inverse}, solver=..., ...), which differentiates "
            "each way with the adjoint that mode needs"
        )
    msg = (
        f"jaxflow.{name}: reverse-mode differentiation (jax.grad, jax.vjp, jax.jacrev) "
        "does not go through this solve: it runs under diffrax.ForwardMode() (the "
        f"default adjoint), which differentiates forwards only (jax.jvp, jax.jacfwd). "
        f"For reverse mode, {advice}."
    )
    return eqxi.nondifferentiable_backward(y, msg=msg, symbolic=True)


def raise_or_outcome(value, result: RESULTS, name: str, throw: bool, singular: str | None = None):
    """With `throw`, `value` with an `eqx.error_if` per cause; else an `Outcome`.
    `singular` is `singular_end`'s message, for `RESULTS.singular_field`."""
    if not throw:
        return Outcome(value=mask_failed(value, result == RESULTS.successful), result=result)
    messages = [
        (
            RESULTS.invalid_input,
            "the input contains NaN or inf, or a time lies outside the path's range "
            "[t_data, t_noise].",
        ),
        (RESULTS.singular_field, singular or "the field is singular at an end of the span."),
        (
            RESULTS.field_non_finite,
            "the field's velocity is NaN or inf at the starting point (a network or "
            "law returning NaN there, or parameters that are not finite).",
        ),
        (
            RESULTS.non_finite,
            "the solution is not finite; the field is singular on this span or the "
            "step is too large.",
        ),
    ]
    known = result != RESULTS.successful
    for item, message in messages:
        value = eqx.error_if(value, result == item, f"jaxflow.{name}: {message}")
        known = known & (result != item)
    return eqx.error_if(
        value,
        known,
        f"jaxflow.{name}: the ODE solver did not reach the end time: it ran out of "
        "max_steps or its step size collapsed. Raise `max_steps`, loosen "
        "`rtol`/`atol`, or use a fixed-step solver with `steps=`.",
    )


def check_throw(throw) -> bool:
    return check_bool("throw", throw)


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
    x = jnp.asarray(as_array(f"{name}: the point", x, "(n,)"))
    if x.ndim != 1:
        raise ValueError(
            f"{name} takes one point of shape (n,), got shape {x.shape}; "
            f"batch with jax.vmap(lambda x: jf.{name}(field, x))(xs)."
        )
    dim = field.dim
    if dim is not None and x.shape[0] != dim:
        raise ValueError(f"{name}: point has length {x.shape[0]}, the field's law has n = {dim}.")
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise ValueError(f"{name} takes a real point, got dtype {x.dtype}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    _check_span(field, t_start, t_end)
    ok = jnp.all(jnp.isfinite(x))
    for t in (t_start, t_end):
        if concrete_time("t", t) is None:  # only known under jit
            ok = ok & time_in_range(field.path, t)
    return jnp.where(ok, x, jnp.zeros_like(x)), ok


def span(field: AbstractVelocityField, t_noise=None, t_data=None) -> tuple:
    """`(t_noise, t_data)`: the path's ends unless overridden; `t_noise > t_data`
    is checked (a `ValueError` when both are known, else `eqx.error_if`)."""
    t_noise = field.path.t_noise if t_noise is None else t_noise
    t_data = field.path.t_data if t_data is None else t_data
    known_noise, known_data = concrete_time("t_noise", t_noise), concrete_time("t_data", t_data)
    message = (
        "t_noise={} must be greater than t_data={}: generation runs from t_noise "
        "down to t_data, inversion back up."
    )
    if known_noise is not None and known_data is not None:
        if not known_noise > known_data:
            raise ValueError(message.format(known_noise, known_data))
        return t_noise, t_data
    message = message.format(
        *("(traced)" if value is None else value for value in (known_noise, known_data))
    )
    # the check rides on a traced end, so that an end known in Python stays known
    if known_noise is None:
        return eqx.error_if(t_noise, ~(t_noise > t_data), message), t_data
    return t_noise, eqx.error_if(t_data, ~(t_noise > t_data), message)


def _pf_ode(
    field, y, direction: Direction, *, t_noise, t_data, times=None, throw=True, **solve_kwargs
):
    """The PF-ODE from one end of the span to the other: towards the data for
    `direction='generate'`, towards the noise for `'invert'`."""
    throw = check_throw(throw)
    start, end, times = _pf_ode_span(field, direction, t_noise, t_data, times)
    y, ok = prepare(field, y, start, end, direction)
    singular = singular_end(field, start, end)
    y, result = solve_ode(
        velocity_term(field),
        y,
        start,
        end,
        name=direction,
        times=times,
        input_ok=ok,
        singular=singular,
        **solve_kwargs,
    )
    return raise_or_outcome(y, result, direction, throw, singular)


def _pf_ode_span(field, direction: Direction, t_noise, t_data, times):
    """`(start, end, times)` of a PF-ODE solve: the ends `t_noise > t_data`, or those
    of a `times` grid, checked (the grid walked backwards to generate)."""
    if times is not None:
        times = check_time_grid(times, t_noise, t_data)
        t_noise, t_data = float(times[-1]), float(times[0])
        if direction == "generate":
            times = times[::-1]
    t1, t0 = span(field, t_noise, t_data)
    start, end = (t1, t0) if direction == "generate" else (t0, t1)
    return start, end, times


def check_pf_ode_settings(field: AbstractVelocityField, direction: Direction, settings: dict):
    """Make the checks of `generate`'s (or `invert`'s) settings that it makes before
    it solves, without a point and without solving: the same functions, the same
    `ValueError`s, plus one naming a keyword that `generate` does not take.

    For `jf.generation_map`, which holds the settings of solves it runs later and
    must refuse bad ones when it is built, not at its first call.
    """
    solve = generate if direction == "generate" else invert
    signature = inspect.signature(solve)
    names = [name for name in signature.parameters if name not in ("field", "z", "x")]
    unknown = [name for name in settings if name not in names]
    if unknown:
        raise ValueError(
            f"jf.{direction} has no setting {', '.join(map(repr, unknown))}; its settings "
            f"are {', '.join(names)}."
        )
    bound = signature.bind(field, None, **settings)
    bound.apply_defaults()
    a = bound.arguments
    check_throw(a["throw"])
    start, end, times = _pf_ode_span(field, direction, a["t_noise"], a["t_data"], a["times"])
    _check_span(field, start, end)
    dtype = jnp.result_type(float)
    _solver_settings(
        a["solver"],
        a["steps"],
        a["rtol"],
        a["atol"],
        a["max_steps"],
        start,
        end,
        dtype,
        None if times is None else jnp.asarray(times, dtype),
    )


def generate(
    field: AbstractVelocityField,
    z: Float[ArrayLike, "..."],
    *,
    solver="dopri5",
    steps: int | np.integer | None = None,
    rtol: Real[ArrayLike, ""] | None = None,
    atol: Real[ArrayLike, ""] | None = None,
    max_steps: int | np.integer = DEFAULT_MAX_STEPS,
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
    - `max_steps`: bound on the number of steps (a positive int); reaching it is
      an error.
    - `t_noise, t_data`: override the ends of the span (e.g. stop at `t_data=1e-3`
      for an `Empirical` law, whose velocity is singular at 0).
    - `adjoint`: a diffrax adjoint; default `ForwardMode()` (so `jvp`/`jacfwd` work,
      at the cost of a plain solve; reverse mode through it raises, saying what to
      pass). For `jax.grad`/`jax.vjp` pass `diffrax.RecursiveCheckpointAdjoint()`.
      With an adaptive solver the derivative is of the steps taken, not under error
      control (14% off near paper 000's Fig. 3 ridge at the default `rtol`):
      `jf.generate_with_jacobian` controls `J_G`'s error; a fixed-step solver makes
      the discrete map the exact object.
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

    **Returns:** `G(z)`, shape `(n,)`, in `z`'s dtype (integrated in float32 or
    wider); with `throw=False`, an `Outcome` holding it.

    **Raises:** `ValueError` for bad settings or a point of the wrong shape; under
    `jit`, `eqx.error_if` naming the cause of a failed solve (docs/reliability.md);
    `RuntimeError` naming `adjoint=diffrax.RecursiveCheckpointAdjoint()` and
    `jf.generation_map` when differentiated in reverse mode under the default
    forward-mode adjoint.
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
    steps: int | np.integer | None = None,
    rtol: Real[ArrayLike, ""] | None = None,
    atol: Real[ArrayLike, ""] | None = None,
    max_steps: int | np.integer = DEFAULT_MAX_STEPS,
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
    x = jnp.asarray(x, x_hat.dtype)
    r = jnp.linalg.norm(x - x_hat) / jnp.sqrt(x.shape[-1])
    return r if throw else Outcome(value=r, result=out.result)
