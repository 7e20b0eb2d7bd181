"""Finite-time Lyapunov exponents and vectors by the QR (Benettin) method.

Along a path `x_{i+1} = F_i(x_i)`, an orthonormal frame `Q_i` (n x k) is pushed
forward with JVPs and re-orthonormalised, `dF_i(x_i) Q_i = Q_{i+1} R_i`; the
exponents are the time averages of `log |diag R_i|` and the columns of the final
`Q` span the most sensitive k-dimensional subbundle (paper 003 section 4,
appendix A; DESIGN §5). Nothing of the path is stored but the per-step stretching
factors, when asked for.

Covariant Lyapunov vectors (Ginelli et al. 2007, Phys. Rev. Lett. 99, 130601)
come from a backward pass over the `R` factors of the last steps: `C_i = R_i^{-1}
C_{i+1}`, column-normalised, from `C = I`; the vectors are `Q C` where the pass
ends. Unlike the orthonormal (backward) vectors they are carried into each other
by the dynamics, `dF_i v_j(x_i) ∝ v_j(x_{i+1})`, and are the eigenvectors for a
constant linear map.
"""

import dataclasses
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._solve import get_solver


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
      state `covariant` steps before its end; `None` unless asked for.
    """

    exponents: Float[Array, " k"]
    vectors: Float[Array, "n k"]
    log_stretch: Float[Array, "steps k"] | None
    order: Array
    final_state: Float[Array, " n"]
    covariant_vectors: Float[Array, "n k"] | None = None
    covariant_state: Float[Array, " n"] | None = None


def _initial_frame(n, k, dtype, key, frame):
    if frame is not None:
        frame = jnp.asarray(frame, dtype)
        if frame.shape != (n, k):
            raise ValueError(f"frame must have shape ({n}, {k}), got {frame.shape}.")
        q, _ = jnp.linalg.qr(frame)
        return q
    if key is None:
        return jnp.eye(n, k, dtype=dtype)
    q, _ = jnp.linalg.qr(jax.random.normal(key, (n, k), dtype))
    return q


def _check_k(k, n):
    if k is None:
        return n
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, n = {n}], got {k!r}.")
    return k


def _qr_step(step_fn, x, q, i):
    """One step of the path and of the frame: `dF Q = Q' R`, signs fixed so that
    `diag R > 0` and the frame varies continuously."""
    push = jax.vmap(lambda col: jax.jvp(lambda y: step_fn(y, i), (x,), (col,)), in_axes=1)
    xs, aq = push(q)
    q_new, r = jnp.linalg.qr(aq.T)
    sign = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(q.dtype)
    # Q' S and S R with S = diag(sign) leave the product unchanged
    return xs[0], q_new * sign, r * sign[:, None]


def _run(step_fn, x0, q0, start, num_steps, save, keep_r=False):
    def body(carry, i):
        x, q, total = carry
        x, q, r = _qr_step(step_fn, x, q, i)
        log_r = jnp.log(jnp.abs(jnp.diagonal(r)))
        return (x, q, total + log_r), (log_r if save else None, r if keep_r else None)

    k = q0.shape[1]
    init = (x0, q0, jnp.zeros(k, x0.dtype))
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


def _spectrum(step_fn, x0, q0, n_transient, averaged, save, covariant, scale, what):
    """Transient, then `averaged` steps whose last `covariant` also store `R`."""
    x, q = x0, q0
    if n_transient:
        x, q, _, _, _ = _run(step_fn, x, q, 0, n_transient, False)
    head = averaged - covariant
    x, q, total, log_r, _ = _run(step_fn, x, q, n_transient, head, save)
    if not covariant:
        return _finish(x, q, total, scale, log_r, what)
    x_cov, q_cov = x, q
    x, q, total_tail, log_r_tail, rs = _run(
        step_fn, x, q, n_transient + head, covariant, save, keep_r=True
    )
    if save:
        log_r = jnp.concatenate([log_r, log_r_tail])
    v = q_cov @ _ginelli(rs)
    v = v / jnp.linalg.norm(v, axis=0, keepdims=True)
    return _finish(x, q, total + total_tail, scale, log_r, what, v, x_cov)


def _finish(x, q, total, scale, log_r, what, covariant=None, covariant_state=None):
    exponents = total / scale
    order = jnp.argsort(-exponents)
    bad = ~jnp.all(jnp.isfinite(exponents)) | ~jnp.all(jnp.isfinite(x))
    if covariant is not None:
        bad = bad | ~jnp.all(jnp.isfinite(covariant))
    exponents = eqx.error_if(
        exponents,
        bad,
        f"jaxflow.{what}: the path or the tangent frame became non-finite; check the "
        "field/map for NaN or overflow, or shorten the step.",
    )
    return LyapunovSpectrum(
        exponents=exponents[order],
        vectors=q[:, order],
        log_stretch=log_r,
        order=order,
        final_state=x,
        covariant_vectors=None if covariant is None else covariant[:, order],
        covariant_state=covariant_state,
    )


def _check_covariant(covariant, averaged):
    if not isinstance(covariant, int) or not 0 <= covariant < averaged:
        raise ValueError(
            f"covariant must be an int in [0, {averaged}) (steps of the backward pass, "
            f"fewer than the averaged steps), got {covariant!r}."
        )


def lyapunov_spectrum_of_map(
    step: Callable[[Float[Array, " n"], Array], Float[Array, " n"]],
    x0: Float[Array, " n"],
    num_steps: int,
    *,
    k: int | None = None,
    transient: int = 0,
    key: PRNGKeyArray | None = None,
    frame: Float[Array, "n k"] | None = None,
    save_stretch: bool = True,
    covariant: int = 0,
) -> LyapunovSpectrum:
    """Finite-time Lyapunov exponents (per step) and vectors of a sequence of maps
    `x_{i+1} = step(x_i, i)` (paper 003 section 4: `dF_t E_t = E_{t+1} R_t`).

    **Arguments:**

    - `step`: `step(x, i) -> x_next`, differentiable in `x` (a solver step, an
      Euler-Maruyama step with its noise frozen by `i`, any map).
    - `x0`: the start point `(n,)`.
    - `num_steps`: steps averaged over, after the transient.
    - `k`: how many exponents (`k` JVPs a step); default all `n`.
    - `transient`: steps taken first to align the frame, not averaged
      (indices `0 .. transient-1`; the averaged steps follow).
    - `key` / `frame`: a random initial frame (from `key`) or a given `(n, k)` one;
      default the first `k` coordinate axes.
    - `save_stretch`: keep the per-step `log |diag R|` (`num_steps x k` numbers).
    - `covariant`: if `> 0`, also the covariant (Ginelli) vectors at the state
      `covariant` steps before the end, from a backward pass over the last
      `covariant` steps (it stores their `k x k` `R` factors). Both passes need
      time to converge: a `transient` before, and `covariant` long enough after.

    **Returns:** a `LyapunovSpectrum`.
    """
    x0 = jnp.asarray(x0)
    if x0.ndim != 1:
        raise ValueError(f"x0 must be one point of shape (n,), got {x0.shape}.")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}.")
    if not isinstance(transient, int) or transient < 0:
        raise ValueError(f"transient must be an int >= 0, got {transient!r}.")
    _check_covariant(covariant, num_steps)
    n = x0.shape[0]
    k = _check_k(k, n)
    q = _initial_frame(n, k, x0.dtype, key, frame)
    return _spectrum(
        step,
        x0,
        q,
        transient,
        num_steps,
        save_stretch,
        covariant,
        num_steps,
        "lyapunov_spectrum_of_map",
    )


def lyapunov_spectrum(
    f: Callable[[Float[Array, " n"], Array], Float[Array, " n"]],
    x0: Float[Array, " n"],
    t0: float,
    t1: float,
    *,
    steps: int,
    k: int | None = None,
    transient: float = 0.0,
    solver="tsit5",
    key: PRNGKeyArray | None = None,
    frame: Float[Array, "n k"] | None = None,
    save_stretch: bool = True,
    covariant: float = 0.0,
) -> LyapunovSpectrum:
    """Finite-time Lyapunov exponents (per unit time) and vectors of the flow of
    `dx/dt = f(x, t)` over `[t0, t1]` (paper 003 section 4, appendix C).

    The flow is discretised with `steps` equal steps of a diffrax Runge-Kutta
    solver; each step is a map whose Jacobian is applied to the frame by JVPs
    (the exact tangent dynamics of the discrete flow, so `sum(exponents) * (t1 -
    t0)` is `log|det|` of the discrete map). `t1 < t0` runs backwards in time (the
    generation direction of a PF-ODE).

    **Arguments:**

    - `f`: `f(x, t) -> dx/dt`, any vector field (autonomous or not).
    - `x0`, `t0`, `t1`: start point and time span; `t1 != t0`.
    - `steps`: integration steps over `[t0, t1]`.
    - `k`, `key`, `frame`, `save_stretch`: as for `lyapunov_spectrum_of_map`.
    - `transient`: the first stretch of the span, `[t0, t0 + transient]`, is
      integrated to align the frame but not averaged; the exponents average over
      the rest (rounded to whole steps).
    - `covariant`: if `> 0`, also the covariant (Ginelli) vectors at time
      `t1 - covariant` (towards `t0`), from a backward pass over the last stretch
      `covariant` of the span (rounded to whole steps).
    - `solver`: `'euler' | 'heun' | 'midpoint' | 'tsit5' | 'dopri5' | 'dopri8'` or a
      diffrax Runge-Kutta solver, used with fixed steps.

    **Returns:** a `LyapunovSpectrum`; `log_stretch` rows are per step, not per
    unit time.
    """
    if t1 == t0:
        raise ValueError("t1 equals t0: no time to average over.")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}.")
    x0 = jnp.asarray(x0)
    if x0.ndim != 1:
        raise ValueError(f"x0 must be one point of shape (n,), got {x0.shape}.")
    span = t1 - t0
    if not 0 <= transient < abs(span):
        raise ValueError(f"transient must lie in [0, |t1 - t0| = {abs(span)}), got {transient}.")
    dt = span / steps
    n_transient = int(round(transient / abs(dt)))
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

    n = x0.shape[0]
    k = _check_k(k, n)
    q = _initial_frame(n, k, x0.dtype, key, frame)
    averaged = steps - n_transient
    if covariant < 0:
        raise ValueError(f"covariant must be >= 0, got {covariant}.")
    n_covariant = int(round(covariant / abs(dt)))
    _check_covariant(n_covariant, averaged)
    return _spectrum(
        step,
        x0,
        q,
        n_transient,
        averaged,
        save_stretch,
        n_covariant,
        abs(averaged * dt),
        "lyapunov_spectrum",
    )


def alignment(
    score: Float[Array, "*batch n"], vectors: Float[Array, "*batch n k"]
) -> Float[Array, "*batch k"]:
    """`|<s / |s|, q_i>|` for each column `q_i` of `vectors` (paper 003 Def. 4.2):
    near 0 when the Lyapunov vectors are tangent to the support, where the score
    is normal to it. Batched over leading axes."""
    score = jnp.asarray(score)
    vectors = jnp.asarray(vectors)
    if vectors.shape[:-1] != score.shape:
        raise ValueError(
            f"vectors {vectors.shape} must be score's shape {score.shape} plus a column axis."
        )
    unit = score / jnp.linalg.norm(score, axis=-1, keepdims=True)
    qn = vectors / jnp.linalg.norm(vectors, axis=-2, keepdims=True)
    return jnp.abs(jnp.einsum("...n,...nk->...k", unit, qn))
