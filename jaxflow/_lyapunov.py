"""Finite-time Lyapunov exponents and vectors by the QR (Benettin) method.

Along a path `x_{i+1} = F_i(x_i)`, an orthonormal frame `Q_i` (n x k) is pushed
forward with JVPs and re-orthonormalised, `dF_i(x_i) Q_i = Q_{i+1} R_i`; the
exponents are the time averages of `log |diag R_i|` and the columns of the final
`Q` span the most sensitive k-dimensional subbundle (paper 003 section 4,
appendix A; docs/mathematics.md §5). Nothing of the path is stored but the per-step stretching
factors, when asked for.

Covariant Lyapunov vectors (Ginelli et al. 2007, Phys. Rev. Lett. 99, 130601)
come from a backward pass over the `R` factors of the last steps: `C_i = R_i^{-1}
C_{i+1}`, column-normalised, from `C = I`; the vectors are `Q C` where the pass
ends. Unlike the orthonormal (backward) vectors they are carried into each other
by the dynamics, `dF_i v_j(x_i) ∝ v_j(x_{i+1})`, and are the eigenvectors for a
constant linear map.
"""

import dataclasses
import math
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from ._linalg import qr
from ._misc import (
    as_point,
    check,
    check_finite,
    check_key,
    check_map_output,
    check_nonnegative_int,
    check_number,
    check_positive_int,
)
from ._results import RESULTS, Outcome, classify, mask_failed
from ._solve import check_throw, get_solver

# Steps over [t0, t1] when `lyapunov_spectrum` is given neither `steps` nor `dt`.
DEFAULT_FLOW_STEPS = 1000


class LyapunovSpectrum(eqx.Module):
    """Result of `lyapunov_spectrum` / `lyapunov_spectrum_of_map`.

    - `exponents`: `(k,)`, descending; per unit time for a flow, per step for a map.
    - `vectors`: `(n, k)`, orthonormal columns at the end point, column `i` for
      `exponents[i]` (the top-`k` backward Lyapunov vectors as the horizon grows).
    - `log_stretch`: `(num_steps, k)` per-step `log |diag R|` (columns in the
      frame's order, before sorting), or `None` if not saved.
    - `order`: `(k,)` the frame's column behind each sorted exponent.
    - `final_state`: the end point of the path.
    - `covariant_vectors`: `(n, k)` unit covariant (Ginelli) vectors, column `i`
      for `exponents[i]`, at `covariant_state`; `None` unless asked for.
    - `covariant_state`: the point the covariant vectors belong to, the path's
      state `covariant_steps` steps (a map) or `covariant_time` (a flow) before
      its end; `None` unless asked for.
    """

    exponents: Float[Array, " k"]
    vectors: Float[Array, "n k"]
    log_stretch: Float[Array, "steps k"] | None
    order: Int[Array, " k"]
    final_state: Float[Array, " n"]
    covariant_vectors: Float[Array, "n k"] | None = None
    covariant_state: Float[Array, " n"] | None = None


@dataclasses.dataclass(frozen=True)
class _Schedule:
    """How the steps of a path are spent, in whole steps and in order.

    - `transient_steps`: taken first, to align the frame; not averaged.
    - `averaged_steps`: the steps the exponents average over.
    - `covariant_steps`: the last of the averaged steps, whose `R` factors are kept
      for the backward (Ginelli) pass; 0 for none.
    - `averaged_span`: what the exponents are "per": the number of averaged steps
      for a map, the (positive) time they span for a flow.
    """

    transient_steps: int
    averaged_steps: int
    covariant_steps: int
    averaged_span: int | float


def _check_k(k, n) -> int:
    """The number of exponents: `k`, or all `n` when `None`."""
    if k is None:
        return n
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, n = {n}], got {k!r}.")
    return int(k)


def _initial_frame(where, n, k, dtype, key, frame) -> Float[Array, "n k"]:
    """The orthonormal `(n, k)` frame to start from: `frame` orthonormalised, a
    random one from `key`, or the first `k` coordinate axes."""
    if frame is not None:
        if key is not None:
            raise ValueError(f"{where}: give key (a random frame) or frame, not both.")
        frame = jnp.asarray(frame, dtype)
        if frame.shape != (n, k):
            raise ValueError(f"frame must have shape ({n}, {k}), got {frame.shape}.")
        q, r = qr(check_finite("frame", frame, where))
        diag = jnp.abs(jnp.diagonal(r))
        tiny = n * jnp.finfo(dtype).eps * jnp.max(diag)
        return check(
            q,
            ~(jnp.min(diag) > tiny),
            f"{where}: the columns of frame must be linearly independent.",
        )
    if key is None:
        return jnp.eye(n, k, dtype=dtype)
    q, _ = qr(jax.random.normal(check_key("key", key), (n, k), dtype))
    return q


def _checked_map(fn, where: str, fn_name: str):
    """`fn(x, i_or_t)`, with its output's shape checked against `x`'s when traced."""

    def checked(x, arg):
        out = jnp.asarray(fn(x, arg))
        check_map_output(where, fn_name, out.shape, x)
        return out

    return checked


def _start(where: str, x0, throw: bool) -> Float[Array, " n"]:
    """`x0` as one point; with `throw`, checked finite (a `ValueError`, or an error at
    run time under `jit`). With `throw=False` a non-finite start is a point's
    failure, reported as `RESULTS.non_finite`."""
    return as_point("x0", x0, where, finite=throw)


def _qr_step(step_fn, x, q, i):
    """One step of the path and of the frame: `dF Q = Q' R`, signs fixed so that
    `diag R > 0` and the frame varies continuously."""
    push = jax.vmap(lambda col: jax.jvp(lambda y: step_fn(y, i), (x,), (col,)), in_axes=1)
    xs, aq = push(q)
    q_new, r = qr(aq.T)
    sign = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(q.dtype)
    # Q' S and S R with S = diag(sign) leave the product unchanged
    return xs[0], q_new * sign, r * sign[:, None]


def _run(step_fn, x, q, *, start: int, num_steps: int, save_stretch: bool, keep_r: bool):
    """Push the path and the frame over steps `start .. start + num_steps - 1`.

    Returns `(x, q, total, log_r, rs)`: the end point and frame, the summed
    `log |diag R|`, and the per-step `log |diag R|` / `R` factors where asked for
    (`None` otherwise, so that nothing of the path is stored by default).
    """

    def body(carry, i):
        x, q, total = carry
        x, q, r = _qr_step(step_fn, x, q, i)
        log_r = jnp.log(jnp.abs(jnp.diagonal(r)))
        return (x, q, total + log_r), (log_r if save_stretch else None, r if keep_r else None)

    init = (x, q, jnp.zeros(q.shape[1], x.dtype))
    (x, q, total), (log_r, rs) = jax.lax.scan(body, init, start + jnp.arange(num_steps))
    return x, q, total, log_r, rs


def _ginelli(rs):
    """Backward pass `C_i = R_i^{-1} C_{i+1}` (columns normalised) over stored
    `R` factors, last step first, from `C = I`."""
    k = rs.shape[-1]

    def body(c, r):
        c = jax.scipy.linalg.solve_triangular(r, c, lower=False)
        return c / jnp.linalg.norm(c, axis=0, keepdims=True), None

    c, _ = jax.lax.scan(body, jnp.eye(k, dtype=rs.dtype), rs, reverse=True)
    return c


def _covariant_vectors(q, rs) -> Float[Array, "n k"]:
    """Unit covariant vectors `Q C` at the start of the stretch whose `R` factors
    are `rs`, `q` being the frame there."""
    v = q @ _ginelli(rs)
    return v / jnp.linalg.norm(v, axis=0, keepdims=True)


def _spectrum(step_fn, x0, q0, *, schedule: _Schedule, save_stretch: bool) -> LyapunovSpectrum:
    """Run `schedule` from `(x0, q0)`: the transient, then the averaged steps, the
    last `covariant_steps` of them keeping their `R` factors."""
    x, q = x0, q0
    if schedule.transient_steps:
        x, q, _, _, _ = _run(
            step_fn,
            x,
            q,
            start=0,
            num_steps=schedule.transient_steps,
            save_stretch=False,
            keep_r=False,
        )
    head = schedule.averaged_steps - schedule.covariant_steps
    x, q, total, log_r, _ = _run(
        step_fn,
        x,
        q,
        start=schedule.transient_steps,
        num_steps=head,
        save_stretch=save_stretch,
        keep_r=False,
    )
    covariant_vectors = covariant_state = None
    if schedule.covariant_steps:
        # the covariant vectors belong to where the stored stretch begins
        covariant_state, q_start = x, q
        x, q, tail_total, tail_log_r, rs = _run(
            step_fn,
            x,
            q,
            start=schedule.transient_steps + head,
            num_steps=schedule.covariant_steps,
            save_stretch=save_stretch,
            keep_r=True,
        )
        total = total + tail_total
        if save_stretch:
            log_r = jnp.concatenate([log_r, tail_log_r])
        covariant_vectors = _covariant_vectors(q_start, rs)
    return _sorted_spectrum(
        total / schedule.averaged_span, q, log_r, x, covariant_vectors, covariant_state
    )


def _sorted_spectrum(
    exponents, q, log_r, x, covariant_vectors, covariant_state
) -> LyapunovSpectrum:
    """A `LyapunovSpectrum` with the exponents in descending order and every
    per-exponent column in the same order (`log_stretch` stays in the frame's)."""
    order = jnp.argsort(-exponents)
    return LyapunovSpectrum(
        exponents=exponents[order],
        vectors=q[:, order],
        log_stretch=log_r,
        order=order,
        final_state=x,
        covariant_vectors=None if covariant_vectors is None else covariant_vectors[:, order],
        covariant_state=covariant_state,
    )


def _result(spectrum: LyapunovSpectrum) -> RESULTS:
    """`non_finite` where the exponents, the path or any vectors are not finite."""
    return classify(
        (
            spectrum.exponents,
            spectrum.vectors,
            spectrum.final_state,
            spectrum.covariant_vectors,
            spectrum.covariant_state,
        )
    )


def _raise_or_outcome(
    spectrum: LyapunovSpectrum, name: str, throw: bool
) -> LyapunovSpectrum | Outcome:
    """With `throw`, the spectrum behind an `eqx.error_if` (so a failure raises under
    `jit` and `vmap` too); else an `Outcome`, NaN where the point failed so that a
    batch keeps its good points."""
    result = _result(spectrum)
    if not throw:
        return Outcome(value=mask_failed(spectrum, result == RESULTS.successful), result=result)
    # on the whole tree, not only the exponents: a caller may use just the vectors
    return eqx.error_if(
        spectrum,
        result != RESULTS.successful,
        f"jaxflow.{name}: the path or the tangent frame became non-finite; check the "
        "field/map for NaN or overflow, or shorten the step.",
    )


def lyapunov_spectrum_of_map(
    step: Callable[[Float[Array, " n"], Array], Float[Array, " n"]],
    x0: Float[ArrayLike, " n"],
    num_steps: int | np.integer,
    *,
    k: int | np.integer | None = None,
    transient_steps: int | np.integer = 0,
    key: PRNGKeyArray | None = None,
    frame: Float[ArrayLike, "n k"] | None = None,
    save_stretch: bool = True,
    covariant_steps: int | np.integer = 0,
    throw: bool = True,
) -> LyapunovSpectrum | Outcome:
    """Finite-time Lyapunov exponents (per step) and vectors of a sequence of maps
    `x_{i+1} = step(x_i, i)` (paper 003 section 4: `dF_t E_t = E_{t+1} R_t`).

    **Arguments:**

    - `step`: `step(x, i) -> x_next`, differentiable in `x` (a solver step, an
      Euler-Maruyama step with its noise frozen by `i`, any map).
    - `x0`: the start point `(n,)`.
    - `num_steps`: steps averaged over, after the transient.
    - `k`: how many exponents (`k` JVPs a step); default all `n`.
    - `transient_steps`: steps taken first to align the frame, not averaged
      (indices `0 .. transient_steps - 1`; the averaged steps follow).
    - `key` / `frame`: a random initial frame (from `key`) or a given `(n, k)` one;
      default the first `k` coordinate axes.
    - `save_stretch`: keep the per-step `log |diag R|` (`num_steps x k` numbers).
    - `covariant_steps`: if `> 0`, also the covariant (Ginelli) vectors at the
      state `covariant_steps` steps before the end, from a backward pass over the
      last `covariant_steps` averaged steps (it stores their `k x k` `R` factors).
      Both passes need steps to converge: `transient_steps` before, and
      `covariant_steps` long enough after.
    - `throw`: `True` raises (also under `jit`/`vmap`) when the path, the frame or
      the exponents become non-finite; `False` returns an `Outcome` instead.

    **Returns:** a `LyapunovSpectrum`; with `throw=False`, a `jf.Outcome` holding
    it, with `result` `RESULTS.non_finite` where the start, the path, the vectors
    or the exponents are not finite (its arrays are then NaN) and
    `RESULTS.successful` elsewhere, so that `jax.vmap` over starting points keeps
    the good ones.

    **Raises:** `ValueError` for `x0` not one point `(n,)` (or, with `throw=True`,
    not finite), `step` not mapping it to its own shape, `num_steps` not a positive
    int, `transient_steps` / `covariant_steps` not ints in range, `k` not an int in
    `[1, n]`, a `frame` of the wrong shape, not finite or of dependent columns,
    both `key` and `frame`, or a `key` that is not one PRNG key. Under `jit` the
    value checks raise at run time.
    """
    throw = check_throw(throw)
    where = "lyapunov_spectrum_of_map"
    x0 = _start(where, x0, throw)
    num_steps = check_positive_int("num_steps", num_steps)
    transient_steps = check_nonnegative_int("transient_steps", transient_steps)
    if check_nonnegative_int("covariant_steps", covariant_steps) >= num_steps:
        raise ValueError(
            f"covariant_steps must be an int in [0, num_steps = {num_steps}) (steps of "
            f"the backward pass, fewer than the averaged steps), got {covariant_steps!r}."
        )
    covariant_steps = int(covariant_steps)
    n = x0.shape[0]
    k = _check_k(k, n)
    q = _initial_frame(where, n, k, x0.dtype, key, frame)
    step = _checked_map(step, where, "step")
    schedule = _Schedule(
        transient_steps=transient_steps,
        averaged_steps=num_steps,
        covariant_steps=covariant_steps,
        averaged_span=num_steps,
    )
    spectrum = _spectrum(step, x0, q, schedule=schedule, save_stretch=save_stretch)
    return _raise_or_outcome(spectrum, where, throw)


def _flow_steps(t0: float, t1: float, steps, dt) -> tuple[int, str]:
    """The number of equal steps over `[t0, t1]` from `steps` or `dt` (at most one
    given), `DEFAULT_FLOW_STEPS` from neither; and how to take more of them (for
    messages)."""
    if steps is not None and dt is not None:
        raise ValueError(
            f"give steps or dt, not both (got steps={steps!r}, dt={dt!r}): steps fixes "
            "the number of equal steps over [t0, t1], dt their largest length."
        )
    if dt is not None:
        dt = check_number("dt", dt, 0, open_low=True, static=True)
        ratio = abs(t1 - t0) / dt
        nearest = round(ratio)
        # |t1 - t0| / dt is often a whole number up to rounding (1.1 / 0.1 is
        # 11.000000000000002): take that number rather than a needless extra step
        steps = nearest if abs(ratio - nearest) <= 1e-9 * ratio else math.ceil(ratio)
        return max(steps, 1), f"a smaller dt (dt={dt:g})"
    if steps is None:
        return DEFAULT_FLOW_STEPS, f"more steps (steps=, default {DEFAULT_FLOW_STEPS})"
    return check_positive_int("steps", steps), f"more steps (steps={steps})"


def _discrete_flow(
    f, t0: float, t1: float, steps: int, solver
) -> Callable[[Float[Array, " n"], Array], Float[Array, " n"]]:
    """`step(y, i)`: step `i` of `steps` equal fixed steps of `solver` from `t0`
    to `t1` for `dy/dt = f(y, t)`."""
    sol = get_solver(solver)
    if isinstance(sol, diffrax.AbstractRungeKutta) and sol.scan_kind is None:
        # diffrax's default stage loop is reverse-mode only; the frame needs JVPs.
        sol = dataclasses.replace(sol, scan_kind="lax")
    lo, hi = min(t0, t1), max(t0, t1)
    # stage times t_a + c (t_b - t_a) can round a hair outside the span, where a
    # field on [0, 1] (a PF-ODE) rightly refuses to be evaluated
    term = diffrax.ODETerm(lambda t, y, args: f(y, jnp.clip(t, lo, hi)))

    def step(y, i):
        a, b = i / steps, (i + 1) / steps
        ta = jnp.asarray(t0 * (1 - a) + t1 * a, y.dtype)
        tb = jnp.asarray(t0 * (1 - b) + t1 * b, y.dtype)
        # a fresh solver state each step, so first-same-as-last solvers evaluate
        # f at y (the step is then a function of y alone, and so is its JVP)
        state = sol.init(term, ta, tb, y, None)
        y1, _, _, _, _ = sol.step(term, ta, tb, y, None, state, made_jump=False)
        return y1

    return step


def _flow_schedule(
    span: float, steps: int, transient_time, covariant_time, finer: str
) -> _Schedule:
    """The `_Schedule` of a flow: the transient and covariant stretches of time
    rounded to whole steps of length `|span| / steps`; `finer` says how to take
    shorter steps (for messages)."""
    transient_time = check_number("transient_time", transient_time, 0, static=True)
    covariant_time = check_number("covariant_time", covariant_time, 0, static=True)
    if not transient_time < abs(span):
        raise ValueError(
            f"transient_time must lie in [0, |t1 - t0| = {abs(span):g}), got {transient_time:g}."
        )
    h = abs(span) / steps
    transient_steps = int(round(transient_time / h))
    averaged_steps = steps - transient_steps
    covariant_steps = int(round(covariant_time / h))
    if averaged_steps < 1:
        raise ValueError(
            f"transient_time = {transient_time:g} rounds to all {steps} steps of length "
            f"{h:g}: no step is left to average over; shorten transient_time or take "
            f"{finer}."
        )
    if not covariant_steps < averaged_steps:
        raise ValueError(
            f"covariant_time = {covariant_time:g} rounds to {covariant_steps} steps of "
            f"length {h:g}; it must be shorter than the averaged stretch, |t1 - t0| - "
            f"transient_time = {abs(span) - transient_time:g} ({averaged_steps} steps): "
            f"shorten covariant_time or take {finer}."
        )
    return _Schedule(
        transient_steps=transient_steps,
        averaged_steps=averaged_steps,
        covariant_steps=covariant_steps,
        averaged_span=averaged_steps * h,
    )


def lyapunov_spectrum(
    f: Callable[[Float[Array, " n"], Array], Float[Array, " n"]],
    x0: Float[ArrayLike, " n"],
    t0: float,
    t1: float,
    *,
    steps: int | np.integer | None = None,
    dt: float | None = None,
    k: int | np.integer | None = None,
    transient_time: float = 0.0,
    solver="tsit5",
    key: PRNGKeyArray | None = None,
    frame: Float[ArrayLike, "n k"] | None = None,
    save_stretch: bool = True,
    covariant_time: float = 0.0,
    throw: bool = True,
) -> LyapunovSpectrum | Outcome:
    """Finite-time Lyapunov exponents (per unit time) and vectors of the flow of
    `dx/dt = f(x, t)` over `[t0, t1]` (paper 003 section 4, appendix C).

    The flow is discretised with equal fixed steps of a diffrax Runge-Kutta solver;
    each step is a map whose Jacobian is applied to the frame by JVPs (the exact
    tangent dynamics of the discrete flow, so `sum(exponents) * (t1 - t0)` is
    `log|det|` of the discrete map). `t1 < t0` runs backwards in time (the
    generation direction of a PF-ODE).

    The exponents are those of the discretised flow, and converge to the flow's as
    the step shrinks (at the solver's order). To choose the step, compute the
    spectrum with two step counts (say `steps` and `2 * steps`) and keep the finer
    once they agree to the accuracy you need.

    **Arguments:**

    - `f`: `f(x, t) -> dx/dt`, any vector field (autonomous or not).
    - `x0`, `t0`, `t1`: start point and time span; `t1 != t0`.
    - `steps`: the number of equal integration steps over `[t0, t1]`.
    - `dt`: or the largest step length instead: `ceil(|t1 - t0| / dt)` equal steps
      (a ratio within rounding of a whole number counts as that number). Give at
      most one of `steps` and `dt`; with neither, `1000` equal steps.
    - `k`, `key`, `frame`, `save_stretch`: as for `lyapunov_spectrum_of_map`.
    - `transient_time`: the first stretch of the span, `[t0, t0 + transient_time]`
      (towards `t1`), is integrated to align the frame but not averaged; the
      exponents average over the rest (rounded to whole steps).
    - `covariant_time`: if `> 0`, also the covariant (Ginelli) vectors at time
      `t1 - covariant_time` (towards `t0`), from a backward pass over the last
      stretch `covariant_time` of the span (rounded to whole steps).
    - `solver`: `'euler' | 'heun' | 'midpoint' | 'tsit5' | 'dopri5' | 'dopri8'` or a
      diffrax Runge-Kutta solver, used with fixed steps.
    - `throw`: as for `lyapunov_spectrum_of_map`.

    **Returns:** a `LyapunovSpectrum` (`log_stretch` rows are per step, not per
    unit time); with `throw=False`, a `jf.Outcome` holding it, as for
    `lyapunov_spectrum_of_map`.

    **Raises:** `ValueError` as `lyapunov_spectrum_of_map` (for `f`, `x0`, `k`,
    `key`, `frame`), and for `t0`, `t1`, `dt`, `transient_time`, `covariant_time`
    not finite numbers known in Python (they fix the steps), `t1 == t0`, both
    `steps` and `dt`, `steps` not a positive int, `dt <= 0`, a `transient_time`
    outside `[0, |t1 - t0|)` or leaving no step to average over, and a
    `covariant_time < 0` or not shorter than the averaged stretch.
    """
    throw = check_throw(throw)
    where = "lyapunov_spectrum"
    t0 = check_number("t0", t0, static=True)
    t1 = check_number("t1", t1, static=True)
    if t1 == t0:
        raise ValueError("t1 equals t0: no time to average over.")
    steps, finer = _flow_steps(t0, t1, steps, dt)
    x0 = _start(where, x0, throw)
    schedule = _flow_schedule(t1 - t0, steps, transient_time, covariant_time, finer)
    step = _discrete_flow(_checked_map(f, where, "f"), t0, t1, steps, solver)
    n = x0.shape[0]
    k = _check_k(k, n)
    q = _initial_frame(where, n, k, x0.dtype, key, frame)
    spectrum = _spectrum(step, x0, q, schedule=schedule, save_stretch=save_stretch)
    return _raise_or_outcome(spectrum, where, throw)


def alignment(
    score: Float[ArrayLike, "*batch n"], vectors: Float[ArrayLike, "*batch n k"]
) -> Float[Array, "*batch k"]:
    """`|<s / |s|, q_i>|` for each column `q_i` of `vectors` (paper 003 Def. 4.2):
    near 0 when the Lyapunov vectors are tangent to the support, where the score
    is normal to it. Batched over leading axes.

    **Raises:** `ValueError` (under `jit`, at run time) where the shapes do not
    match, an entry is not finite, the score is zero (no direction: the alignment is
    undefined there) or a column of `vectors` is zero.
    """
    where = "alignment"
    score = jnp.asarray(score)
    vectors = jnp.asarray(vectors)
    if vectors.shape[:-1] != score.shape or score.ndim == 0:
        raise ValueError(
            f"vectors {vectors.shape} must be score's shape {score.shape} plus a column axis."
        )
    score = check_finite("score", score, where)
    vectors = check_finite("vectors", vectors, where)
    score = check(
        score,
        jnp.all(score == 0, axis=-1),
        f"{where}: score is zero at some point, where it has no direction; leave such points out.",
    )
    vectors = check(vectors, jnp.all(vectors == 0, axis=-2), f"{where}: vectors has a zero column.")
    unit = score / jnp.linalg.norm(score, axis=-1, keepdims=True)
    qn = vectors / jnp.linalg.norm(vectors, axis=-2, keepdims=True)
    return jnp.abs(jnp.einsum("...n,...nk->...k", unit, qn))
