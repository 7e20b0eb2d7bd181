"""`log |det J_G(z)|` of the generation map by independent routes, the inversion
with its log-determinant, and the generation map together with its Jacobian
(variational equation).

Paper 000 Lemma D.1 (an equality):
`log |det J_G(z)| = log p_noise(z) - log p_gen(G(z)) = -int_0^1 div v(x_t, t) dt`.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from ._fields import AbstractVelocityField, AnalyticField, divergence, divergence_method
from ._instability import log_abs_det_jacobian
from ._matrix_free._trace import (
    Estimate,
    check_method,
    gaussian,
    hutchinson_terms,
    hutchpp_terms,
    mean_and_stderr,
    rademacher,
)
from ._misc import as_point, check_bool, check_key, check_positive_int, check_time
from ._results import Outcome, mask_failed
from ._solve import (
    check_throw,
    generate,
    prepare,
    raise_or_outcome,
    singular_end,
    solve_ode,
    span,
)


def _span(field, kwargs, name):
    """`(t_noise, t_data)` from `kwargs` (popped), for entry point `name`: a field
    is required, and times known in Python are checked by the names they were
    passed under."""
    if not isinstance(field, AbstractVelocityField):
        raise ValueError(f"{name} needs a jaxflow field, got {type(field).__name__}.")
    t_noise = check_time("t_noise", field.path, kwargs.pop("t_noise", None))
    t_data = check_time("t_data", field.path, kwargs.pop("t_data", None))
    return span(field, t_noise, t_data)


def _point(name, z, where, field, throw):
    """`z` one point of the field's dimension; with `throw`, checked finite (a
    `ValueError`, or an error at run time under `jit`), so that the messages name
    it. With `throw=False` a non-finite point is that point's `invalid_input`."""
    z = as_point(name, z, where, finite=throw)
    if field.dim is not None and z.shape[0] != field.dim:
        raise ValueError(
            f"{where}: {name} has length {z.shape[0]}, the field's law has n = {field.dim}."
        )
    return z


def _check_key(key, divergence, field, route):
    """`key` one PRNG key, or `None`; `key` and `divergence` only with the routes
    that use them."""
    if key is not None:
        check_key("key", key)
    if route in ("density", "dense") and (key is not None or divergence != "auto"):
        raise ValueError(
            f"key and divergence= choose the divergence of route='divergence'; "
            f"route={route!r} uses neither."
        )
    if divergence != "auto" or key is not None:
        divergence_method(field, key, divergence)  # argument errors before tracing


def log_det_generation(
    field: AbstractVelocityField,
    z: Float[ArrayLike, "..."],
    *,
    route: str = "divergence",
    key: PRNGKeyArray | None = None,
    divergence: str = "auto",
    throw: bool = True,
    **solve_kwargs,
) -> Float[Array, ""] | Outcome:
    """`log |det J_G(z)|` of the generation map, by one of three routes.

    **Arguments:**

    - `field`, `z`: the field and one noise point `(n,)`.
    - `route`:
        - `'divergence'` (default): integrate `d l / dt = div v(x_t, t)` along the
          trajectory together with `x_t`, `l(t_noise) = 0`. The divergence is the
          closed form for Gaussian / mixture laws, else the exact trace of `dv/dx`
          (`n` JVPs a stage); with a `key`, Hutchinson's estimate
          `eps^T (dv/dx) eps` with one Rademacher probe held fixed along the path
          (one JVP a stage, unbiased, noisy). `divergence=` forces one of
          `'closed_form' | 'trace' | 'hutchinson'`.
        - `'density'`: `log p_noise(z) - log p_gen(G(z))` with the closed-form
          marginals of an `AnalyticField` (exact for an exact `G`).
        - `'dense'`: `log |det|` of the dense `jacfwd` Jacobian through the solver.
    - `key`: Hutchinson probe key (only with `route='divergence'`).
    - `throw`: as for `jf.generate`: `False` returns an `Outcome`.
    - `**solve_kwargs`: as for `jf.generate`.

    **Returns:** `log |det J_G(z)|`; with `throw=False`, an `Outcome` holding it.

    **Raises:** `ValueError` for an unknown `route` or `divergence`, a `key` that is
    not one PRNG key, `key` / `divergence=` with a route that uses neither,
    `route='dense'` with `throw=False`, `route='density'` without an
    `AnalyticField`, `z` not one point of the field's dimension (with `throw=True`,
    or not finite: under `jit` an error at run time), and `t_noise` / `t_data`
    outside the path; and as `jf.generate` for the solver's arguments.
    """
    throw = check_throw(throw)
    name = "log_det_generation"
    if route not in ("divergence", "density", "dense"):
        raise ValueError(f"route must be 'divergence', 'density' or 'dense', got {route!r}.")
    kwargs = dict(solve_kwargs)
    t1, t0 = _span(field, kwargs, name)
    _check_key(key, divergence, field, route)
    z = _point("z", z, name, field, throw)
    if route == "dense":
        if not throw:
            raise ValueError(
                "route='dense' differentiates through the solve and cannot report a "
                "per-point status; use route='divergence' with throw=False."
            )
        return log_abs_det_jacobian(
            lambda y: generate(field, y, t_noise=t1, t_data=t0, **kwargs), z
        )
    if route == "density":
        if not isinstance(field, AnalyticField):
            raise ValueError("route='density' needs an AnalyticField (closed-form marginals).")
        x = generate(field, z, t_noise=t1, t_data=t0, throw=throw, **kwargs)
        x_value = x if throw else x.value
        path = field.path
        logdet = field.law.marginal_log_prob(
            z, path.alpha(t1), path.sigma(t1)
        ) - field.law.marginal_log_prob(x_value, path.alpha(t0), path.sigma(t0))
        if throw:
            return logdet
        return Outcome(value=mask_failed(logdet, x.ok), result=x.result)
    out = _solve_with_divergence(field, z, t1, t0, key, divergence, name, throw, kwargs)
    return out[1] if throw else Outcome(value=out.value[1], result=out.result)


def _divergence_rhs(field, key, method, t, y):
    x, _ = y
    return field.velocity_unchecked(x, t), divergence(field, x, t, key, method)


def _solve_with_divergence(field, y0, start, end, key, method, name, throw, kwargs):
    # d/dt log|det dx_t/dx_start| = div v(x_t, t) (paper 000 eq. A29), integrated from 0.
    y0, ok = prepare(field, y0, start, end, name)
    singular = singular_end(field, start, end)

    y, result = solve_ode(
        jax.tree_util.Partial(_divergence_rhs, field, key, method),
        (y0, jnp.zeros((), y0.dtype)),
        start,
        end,
        name=name,
        input_ok=ok,
        singular=singular,
        **kwargs,
    )
    return raise_or_outcome(y, result, name, throw, singular)


def _estimate_rhs(field, s, g, t, y):
    # the PF-ODE with Hutchinson's (s is None) or Hutch++'s terms of div v
    x = y[0]
    v, jvp = jax.linearize(lambda p: field.velocity_unchecked(p, t), x)

    def matvec(u):  # in the state's dtype (a float64 law under a float32 state)
        return jvp(u).astype(x.dtype)

    if s is None:
        return v, jnp.zeros((), x.dtype), hutchinson_terms(matvec, g.astype(x.dtype))
    exact, terms = hutchpp_terms(matvec, s.astype(x.dtype), g.astype(x.dtype))
    return v, exact, terms


def log_det_estimate(
    field: AbstractVelocityField,
    z: Float[ArrayLike, "..."],
    *,
    key: PRNGKeyArray,
    probes: int | np.integer = 8,
    sketch: int | np.integer | None = None,
    method: str = "hutch++",
    inverse: bool = False,
    throw: bool = True,
    **solve_kwargs,
) -> Estimate | Outcome:
    """`log |det J_G(z)|` with a standard error, from variance-reduced stochastic
    divergences integrated along the trajectory: the matrix-free route for large
    `n` (paper 000 Lemma D.1, `log |det J_G(z)| = -int_0^1 div v(x_t, t) dt`, with
    the sign convention of `log_det_generation`: `d l / dt = div v(x_t, t)`
    integrated from `t_noise` down to `t_data`).

    With `A(t) = (dv/dx)(x_t, t)`, the probes `g_1..g_m` (Rademacher) and, for
    Hutch++, the sketch `S` (Gaussian) are drawn once from `key` and held fixed
    along the path; one solve integrates, alongside `x_t`,

    - `'hutchinson'`: `d r_i / dt = g_i^T A(t) g_i` for each probe (`m` JVPs a
      stage). The integrated `r_i` are i.i.d. unbiased estimates of the
      integral: `value = mean(r_i)`, `stderr = std(r_i) / sqrt(m)`.
    - `'hutch++'` (default; Meyer, Musco, Musco & Woodruff 2021, applied at each
      stage): `Q(t) = orth(A(t) S)` recomputed at each stage from the fixed `S`,
      `d e / dt = tr(Q(t)^T A(t) Q(t))` (exact, given `S`) and
      `d r_i / dt = g_i^T P(t) A(t) P(t) g_i`, `P = I - Q Q^T` (`2k + m` JVPs a
      stage). As `tr(Q^T A Q) + E[g^T P A P g] = tr(A)` for every `t`, and the
      `g_i` are independent of `S`, the integrated `r_i` are i.i.d. given `S`:
      `value = e + mean(r_i)`, `stderr = std(r_i) / sqrt(m)`. Both parts depend
      on `Q(t)` only through the projector `Q Q^T`, smooth in `t`, so an adaptive
      solver integrates them as it does `x_t`.

    The estimate is unbiased for the solver's `log |det|` (the integral of the
    exact divergence along the same solve, to the solver's accuracy), and the
    standard error is that of the stochastic part only: it does not include the
    solver's own error. Hutch++ pays where `A(t)` has a few dominant directions
    (a field whose posterior moves mainly along a low-dimensional subspace);
    Hutchinson with Rademacher probes is exact for a diagonal `A(t)`, which the
    projection `P` spoils, so it is better where `A(t)` is diagonal plus a small
    low-rank part: on a diagonal-covariance mixture at `n = 4096` (rectified flow,
    8 probes) Hutchinson's standard error was 0.18 against Hutch++'s 1.4 (on
    `log |det| = -2928`), at a third of the JVPs. Where the responsibilities switch
    sharply between few components (paper 000's Gaussian neighbours), the low-rank
    part dominates: at n = 32, 4 probes, Hutchinson's standard error was as large
    as the value, Hutch++'s (4 probes, a sketch of 4) a few nats, within 0.02% of
    the densities. Choose by the field.

    **Arguments:**

    - `field`, `z`: the field and one noise point `(n,)` (a data point with
      `inverse=True`).
    - `key`: one PRNG key (the probes and the sketch).
    - `probes`: `m`, the number of Hutchinson probes (>= 2, for a standard error).
    - `sketch`: `k`, Hutch++'s sketch columns (capped at `n`); `None` for `probes`
      (Meyer et al.'s equal split). Only with `method='hutch++'`.
    - `method`: `'hutch++'` or `'hutchinson'`.
    - `inverse`: `True` to estimate `log |det J_{G^{-1}}(x)|` at a data point
      `x` instead, along the inversion (from `t_data` up to `t_noise`): the
      matrix-free counterpart of `jf.invert_with_log_det`, and the route to trust
      where `G` expands enormously (`-log |det J_{G^{-1}}(x)| = log |det J_G(z)|`
      at `z = G^{-1}(x)`; regenerating from `z` would follow another trajectory).
    - `throw`: as for `jf.generate`: `False` returns an `Outcome` holding the
      `Estimate`.
    - `**solve_kwargs`: as for `jf.generate`.

    **Returns:** an `Estimate(value, stderr)` of `log |det J_G(z)|` (of
    `log |det J_{G^{-1}}(x)|` with `inverse=True`); with `throw=False`, an
    `Outcome` holding it. `jf.geometric_mean_from_log_det`
    turns it into `Ebar_G(z) = |det J_G(z)|^(1/n)`.

    **Raises:** `ValueError` for a `key` that is not one PRNG key, `probes` not an
    int >= 2, `sketch` not a positive int (or given with `'hutchinson'`), an
    unknown `method`, `inverse` not a bool, and as `log_det_generation` (route
    `'divergence'`) for the field, `z`, the times and the solver's arguments.
    """
    throw = check_throw(throw)
    name = "log_det_estimate"
    kwargs = dict(solve_kwargs)
    t1, t0 = _span(field, kwargs, name)
    check_key("key", key)
    method = check_method(name, method)
    m = check_positive_int("probes", probes)
    if m < 2:
        raise ValueError(f"{name}: probes must be >= 2 for a standard error, got {probes!r}.")
    if sketch is not None:
        if method != "hutch++":
            raise ValueError(f"{name}: sketch= is Hutch++'s; method={method!r} has none.")
        sketch = check_positive_int("sketch", sketch)
    inverse = check_bool("inverse", inverse)
    z = _point("x" if inverse else "z", z, name, field, throw)
    start, end = (t0, t1) if inverse else (t1, t0)
    z, ok = prepare(field, z, start, end, name)
    n = z.shape[0]
    k = min(m if sketch is None else sketch, n)
    sketch_key, probe_key = jax.random.split(key)
    g = rademacher(probe_key, (m, n), z.dtype)
    s = gaussian(sketch_key, (k, n), z.dtype) if method == "hutch++" else None

    singular = singular_end(field, start, end)
    y0 = (z, jnp.zeros((), z.dtype), jnp.zeros((m,), z.dtype))
    rhs = jax.tree_util.Partial(_estimate_rhs, field, s, g)
    y, result = solve_ode(rhs, y0, start, end, name=name, input_ok=ok, singular=singular, **kwargs)
    _, exact, terms = y
    mean, stderr = mean_and_stderr(terms)
    estimate = Estimate(exact + mean, stderr)
    return raise_or_outcome(estimate, result, name, throw, singular)


def geometric_mean_from_log_det(log_det: Estimate, n: int | np.integer) -> Estimate:
    """`Ebar = |det J|^(1/n) = exp(log |det J| / n)` (paper 000 Def. 4.1, the
    geometric mean of the singular values) from an estimate of `log |det J|`,
    with the standard error propagated to first order (delta method):
    `stderr(Ebar) = Ebar * stderr(log |det J|) / n`.

    `exp` of an unbiased `log |det|` is biased upwards by the factor
    `exp(stderr^2 / (2 n^2))` (for a normal error): negligible at large `n`.

    **Arguments:**

    - `log_det`: an `Estimate` of `log |det J|` (`jf.log_det_estimate`,
      `jf.log_det_slq`).
    - `n`: the dimension (a positive int).

    **Returns:** an `Estimate(value, stderr)` of `Ebar`.

    **Raises:** `ValueError` for `log_det` not an `Estimate` or `n` not a positive
    int.
    """
    if not isinstance(log_det, Estimate):
        raise ValueError(
            "geometric_mean_from_log_det takes an Estimate (from jf.log_det_estimate or "
            f"jf.log_det_slq), got {type(log_det).__name__}."
        )
    n = check_positive_int("n", n)
    value = jnp.exp(log_det.value / n)
    return Estimate(value, value * log_det.stderr / n)


def invert_with_log_det(
    field: AbstractVelocityField,
    x: Float[ArrayLike, "..."],
    *,
    key: PRNGKeyArray | None = None,
    divergence: str = "auto",
    throw: bool = True,
    **solve_kwargs,
) -> tuple[Float[Array, " n"], Float[Array, ""]] | Outcome:
    """`(G^{-1}(x), log|det J_{G^{-1}}(x)|)` from one solve of the inversion with
    `d l / dt = div v(x_t, t)` alongside (paper 000 Lemma D.1).

    `-log|det J_{G^{-1}}(x)| = log|det J_G(z)|` at `z = G^{-1}(x)`. Where `G` expands
    enormously, this is the route to trust: regenerating from `z` does not return to
    `x` (the instability itself), so anything measured along the generation from `z`
    follows another trajectory, and a dense Jacobian of the inversion loses its small
    singular values to round-off.

    **Arguments:** as for `log_det_generation` (route `'divergence'`).

    **Returns:** `(G^{-1}(x), log|det J_{G^{-1}}(x)|)`; with `throw=False`, an
    `Outcome` holding the pair.

    **Raises:** as `log_det_generation` (route `'divergence'`), for `x`.
    """
    throw = check_throw(throw)
    name = "invert_with_log_det"
    kwargs = dict(solve_kwargs)
    t1, t0 = _span(field, kwargs, name)
    _check_key(key, divergence, field, "divergence")
    x = _point("x", x, name, field, throw)
    return _solve_with_divergence(field, x, t0, t1, key, divergence, name, throw, kwargs)


def variational_rhs(field: AbstractVelocityField) -> Callable:
    """`(t, (x, J)) -> (v(x, t), (dv/dx)(x, t) J)`: the PF-ODE with its variational
    equation, whose solution from `J = I` is the flow map's Jacobian; one JVP per
    column of `J`. A pytree, not a closure, as `solve_ode` asks."""
    return jax.tree_util.Partial(_variational_rhs, field)


def _variational_rhs(field, t, y):
    x, jac = y
    return jax.vmap(
        lambda col: jax.jvp(lambda p: field.velocity_unchecked(p, t), (x,), (col,)),
        in_axes=1,
        out_axes=(None, 1),
    )(jac)


def generate_with_jacobian(
    field: AbstractVelocityField, z: Float[ArrayLike, "..."], *, throw: bool = True, **solve_kwargs
) -> tuple[Float[Array, " n"], Float[Array, "n n"]] | Outcome:
    """`(G(z), J_G(z))` from one solve of the variational equation
    `dx/dt = v(x, t)`, `dJ/dt = (dv/dx)(x, t) J`, `J(t_noise) = I`.

    The error control of an adaptive solver sees `J` as well as `x`, so the
    Jacobian is as accurate as the requested tolerance, and nothing is
    differentiated through the solver's step-size logic (cheaper than
    `jax.jacfwd(generate)` for small n).

    **Arguments:** as for `jf.generate`.

    **Returns:** `(G(z), J_G(z))`; with `throw=False`, an `Outcome` holding the pair.

    **Raises:** as `jf.generate`, with `z` (when `throw=True`) and `t_noise` /
    `t_data` named in the messages.
    """
    throw = check_throw(throw)
    name = "generate_with_jacobian"
    kwargs = dict(solve_kwargs)
    t1, t0 = _span(field, kwargs, name)
    z, ok = prepare(field, _point("z", z, name, field, throw), t1, t0, name)

    eye = jnp.eye(z.shape[0], dtype=z.dtype)
    singular = singular_end(field, t1, t0)
    y, result = solve_ode(
        variational_rhs(field),
        (z, eye),
        t1,
        t0,
        name=name,
        input_ok=ok,
        singular=singular,
        **kwargs,
    )
    return raise_or_outcome(y, result, name, throw, singular)
