"""`log |det J_G(z)|` of the generation map by independent routes, the inversion
with its log-determinant, and the generation map together with its Jacobian
(variational equation).

Paper 000 Lemma D.1 (an equality):
`log |det J_G(z)| = log p_noise(z) - log p_gen(G(z)) = -int_0^1 div v(x_t, t) dt`.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from ._fields import AbstractVelocityField, AnalyticField, divergence, divergence_method
from ._instability import log_abs_det_jacobian
from ._misc import as_point, check_key, check_time
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


def _solve_with_divergence(field, y0, start, end, key, method, name, throw, kwargs):
    # d/dt log|det dx_t/dx_start| = div v(x_t, t) (paper 000 eq. A29), integrated from 0.
    y0, ok = prepare(field, y0, start, end, name)
    singular = singular_end(field, start, end)

    def rhs(t, y):
        x, _ = y
        v = field.velocity_unchecked(x, t)
        return v, divergence(field, x, t, key, method)

    y, result = solve_ode(
        rhs,
        (y0, jnp.zeros((), y0.dtype)),
        start,
        end,
        name=name,
        input_ok=ok,
        singular=singular,
        **kwargs,
    )
    return raise_or_outcome(y, result, name, throw, singular)


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

    def rhs(t, y):
        x, jac = y
        v, pushed = jax.vmap(
            lambda col: jax.jvp(lambda p: field.velocity_unchecked(p, t), (x,), (col,)),
            in_axes=1,
            out_axes=(None, 1),
        )(jac)
        return v, pushed

    eye = jnp.eye(z.shape[0], dtype=z.dtype)
    singular = singular_end(field, t1, t0)
    y, result = solve_ode(
        rhs, (z, eye), t1, t0, name=name, input_ok=ok, singular=singular, **kwargs
    )
    return raise_or_outcome(y, result, name, throw, singular)
