"""`log |det J_G(z)|` of the generation map by independent routes, and the
generation map together with its Jacobian (variational equation).

Paper 000 Lemma D.1 (an equality):
`log |det J_G(z)| = log p_noise(z) - log p_gen(G(z)) = -int_0^1 div v(x_t, t) dt`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._fields import AbstractVelocityField, AnalyticField, _divergence, _divergence_method
from ._instability import log_abs_det_jacobian
from ._solve import _prepare, generate, invert, solve_ode, span


def _span(field, kwargs):
    return span(field, kwargs.pop("t_noise", None), kwargs.pop("t_data", None))


def log_det_generation(
    field: AbstractVelocityField,
    z: Float[Array, " n"],
    *,
    route: str = "divergence",
    key: PRNGKeyArray | None = None,
    divergence: str = "auto",
    **solve_kwargs,
) -> Float[Array, ""]:
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
    - `**solve_kwargs`: as for `jf.generate`.
    """
    if route == "dense":
        return log_abs_det_jacobian(lambda y: generate(field, y, **solve_kwargs), z)
    if route == "density":
        if not isinstance(field, AnalyticField):
            raise ValueError("route='density' needs an AnalyticField (closed-form marginals).")
        kwargs = dict(solve_kwargs)
        t1, t0 = _span(field, kwargs)
        x = generate(field, z, t_noise=t1, t_data=t0, **kwargs)
        path = field.path
        return field.law.marginal_log_prob(
            z, path.alpha(t1), path.sigma(t1)
        ) - field.law.marginal_log_prob(x, path.alpha(t0), path.sigma(t0))
    if divergence != "auto" or key is not None:
        _divergence_method(field, key, divergence)  # argument errors before tracing
    if route != "divergence":
        raise ValueError(f"route must be 'divergence', 'density' or 'dense', got {route!r}.")
    kwargs = dict(solve_kwargs)
    t1, t0 = _span(field, kwargs)
    z = _prepare(field, z, t1, t0, "log_det_generation")
    _, logdet = _solve_with_divergence(
        field, z, t1, t0, key, divergence, "log_det_generation", kwargs
    )
    return logdet


def _solve_with_divergence(field, y0, start, end, key, divergence, what, kwargs):
    # d/dt log|det dx_t/dx_start| = div v(x_t, t) (paper 000 eq. A29), integrated from 0.
    def rhs(t, y):
        x, _ = y
        v = field.velocity_unchecked(x, t)
        return v, _divergence(field, x, t, key, divergence)

    return solve_ode(rhs, (y0, jnp.zeros((), y0.dtype)), start, end, what=what, **kwargs)


def invert_with_log_det(
    field: AbstractVelocityField,
    x: Float[Array, " n"],
    *,
    key: PRNGKeyArray | None = None,
    divergence: str = "auto",
    **solve_kwargs,
) -> tuple[Float[Array, " n"], Float[Array, ""]]:
    """`(G^{-1}(x), log|det J_{G^{-1}}(x)|)` from one solve of the inversion with
    `d l / dt = div v(x_t, t)` alongside (paper 000 Lemma D.1).

    `-log|det J_{G^{-1}}(x)| = log|det J_G(z)|` at `z = G^{-1}(x)`. Where `G` expands
    enormously, this is the route to trust: regenerating from `z` does not return to
    `x` (the instability itself), so anything measured along the generation from `z`
    follows another trajectory, and a dense Jacobian of the inversion loses its small
    singular values to round-off. Keywords as for `log_det_generation`.
    """
    if divergence != "auto" or key is not None:
        _divergence_method(field, key, divergence)
    kwargs = dict(solve_kwargs)
    t1, t0 = _span(field, kwargs)
    x = _prepare(field, x, t0, t1, "invert_with_log_det")
    return _solve_with_divergence(field, x, t0, t1, key, divergence, "invert_with_log_det", kwargs)


def generate_with_jacobian(
    field: AbstractVelocityField, z: Float[Array, " n"], **solve_kwargs
) -> tuple[Float[Array, " n"], Float[Array, "n n"]]:
    """`(G(z), J_G(z))` from one solve of the variational equation
    `dx/dt = v(x, t)`, `dJ/dt = (dv/dx)(x, t) J`, `J(t_noise) = I`.

    The error control of an adaptive solver sees `J` as well as `x`, so the
    Jacobian is as accurate as the requested tolerance, and nothing is
    differentiated through the solver's step-size logic (cheaper than
    `jax.jacfwd(generate)` for small n).
    """
    kwargs = dict(solve_kwargs)
    t1, t0 = _span(field, kwargs)
    z = _prepare(field, z, t1, t0, "generate_with_jacobian")

    def rhs(t, y):
        x, jac = y
        v, pushed = jax.vmap(
            lambda col: jax.jvp(lambda p: field.velocity_unchecked(p, t), (x,), (col,)),
            in_axes=1,
            out_axes=(None, 1),
        )(jac)
        return v, pushed

    eye = jnp.eye(z.shape[0], dtype=z.dtype)
    return solve_ode(rhs, (z, eye), t1, t0, what="generate_with_jacobian", **kwargs)


class InstabilityProbability(eqx.Module):
    """Paper 000 Theorem 4.1 quantities, estimated from samples `x ~ pi_real`.

    - `M`: the thresholds, shape `(m,)`.
    - `p_m`: empirical `P_M = pi_real(Ebar_G(G^{-1}(x)) > M)`.
    - `eps`: empirical `pi_real(log p_gen(x) >= -(n/2) log(2 pi M^2) - (2n + 3 sqrt(2n))/2)`
      (eq. 8).
    - `delta`: empirical `pi_real(|G^{-1}(x)|^2 > 2n + 3 sqrt(2n))` (eq. 9).
    - `bound`: `1 - eps - delta`; the theorem says `p_m >= bound`.
    - `log_ebar`: `log Ebar_G(G^{-1}(x))` per sample.
    - `noise_norm2`: `|G^{-1}(x)|^2` per sample (delta counts those above
      `2n + 3 sqrt(2n)`).
    """

    M: Float[Array, " m"]
    p_m: Float[Array, " m"]
    eps: Float[Array, " m"]
    delta: Float[Array, ""]
    bound: Float[Array, " m"]
    log_ebar: Float[Array, " N"]
    noise_norm2: Float[Array, " N"]


def instability_probability(
    field: AnalyticField,
    x: Float[Array, "N n"],
    M: Float[Array, " m"] | float,
    **solve_kwargs,
) -> InstabilityProbability:
    """Estimate `P_M`, `eps`, `delta` of paper 000 Theorem 4.1 from samples `x`.

    `Ebar_G(G^{-1}(x))` comes from the change-of-variables identity
    `log Ebar = (log p_noise(z) - log p_gen(x)) / n` at `z = G^{-1}(x)` (Lemma D.1),
    which stays exact and cheap in high dimension.

    **Arguments:**

    - `field`: an `AnalyticField` (closed-form `p_gen`).
    - `x`: samples of `pi_real`, shape `(N, n)`.
    - `M`: one threshold or several.
    - `**solve_kwargs`: for the inversion, as for `jf.invert`.
    """
    if not isinstance(field, AnalyticField):
        raise ValueError("instability_probability needs an AnalyticField (closed-form p_gen).")
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be a batch of shape (N, n), got {x.shape}.")
    M = jnp.atleast_1d(jnp.asarray(M, x.dtype))
    M = eqx.error_if(M, jnp.any(M <= 0), "instability_probability: M must be > 0.")
    n = x.shape[1]
    path = field.path
    law = field.law
    z = jax.vmap(lambda xi: invert(field, xi, **solve_kwargs))(x)
    a1, s1 = path.alpha(path.t_noise), path.sigma(path.t_noise)
    a0, s0 = path.alpha(path.t_data), path.sigma(path.t_data)
    log_noise = jax.vmap(lambda zi: law.marginal_log_prob(zi, a1, s1))(z)
    log_gen = jax.vmap(lambda xi: law.marginal_log_prob(xi, a0, s0))(x)
    log_ebar = (log_noise - log_gen) / n
    radius2 = 2 * n + 3 * jnp.sqrt(2.0 * n)
    p_m = jnp.mean(log_ebar[None, :] > jnp.log(M)[:, None], axis=1, dtype=x.dtype)
    threshold = -0.5 * n * jnp.log(2 * jnp.pi * M**2) - 0.5 * radius2
    eps = jnp.mean(log_gen[None, :] >= threshold[:, None], axis=1, dtype=x.dtype)
    norm2 = jnp.sum(z**2, -1)
    delta = jnp.mean(norm2 > radius2, dtype=x.dtype)
    return InstabilityProbability(
        M=M,
        p_m=p_m,
        eps=eps,
        delta=delta,
        bound=1 - eps - delta,
        log_ebar=log_ebar,
        noise_norm2=norm2,
    )


def amplified_error_bound(
    step_size: float, m2: float, c: Float[Array, "..."]
) -> Float[Array, "..."]:
    """Paper 000 Prop. 3.1 (eq. 5): the upper bound `U` on the reconstruction error
    satisfies `U >= h M_2 (C - 1) / (2 log C) * C` when `E_G(z, zhat - z) > C`.

    The first factor is the numerical error of the inverted noise, the second `C`
    the instability amplification. `C = 1` is the removable limit `h M_2 / 2`.
    """
    c = jnp.asarray(c)
    safe = jnp.where(jnp.abs(c - 1) < 1e-12, 2.0, c)
    ratio = jnp.where(jnp.abs(c - 1) < 1e-12, 1.0, (safe - 1) / jnp.log(safe))
    return step_size * m2 * ratio / 2 * c
