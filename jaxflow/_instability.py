"""Jacobians of a map `F: R^n -> R^n` and the instability measures of paper 000:
the intrinsic instability and instability coefficients (Def. 2.2, Prop. 2.1), the
segment bound (Prop. E.1), the amplified-error bound (Prop. 3.1) and the Theorem
4.1 statistics.

The pointwise measures take `(fn, x, ...)` for any differentiable `fn` (a
generation map `lambda z: jf.generate(field, z)`, a solver step, a user's map);
none needs a field. `fn` maps a point `(n,)` to `(n,)` and `x` is finite (else a
`ValueError`, or under `jit` an error at run time). The directional measures
(`intrinsic_instability`, `instability_coefficient`, `instability_lower_bound`)
return one number per point: with
`fn = lambda z: jf.generate(field, z, throw=False).value` a point whose solve fails
gives NaN (its tangent too) instead of an error, for a sweep to mark. The dense
Jacobian routes (`jacobian`, `singular_values`, `log_abs_det_jacobian`,
`geometric_mean_singular_value`) refuse a map that is NaN or inf at `x` (or whose
Jacobian is) with an error naming it: NaN is never a singular value.
"""

import math
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Real

from ._fields import AnalyticField
from ._linalg import log_abs_det
from ._linalg import singular_values as dense_singular_values
from ._misc import (
    as_batch,
    as_float_array,
    as_point,
    check,
    check_finite,
    check_map_output,
    check_positive_int,
    is_concrete,
)
from ._results import Outcome
from ._solve import check_throw, invert

Map = Callable[[Float[Array, " n"]], Float[Array, " n"]]


def _jacobian(fn, x, where):
    x = as_point("x", x, where)

    def with_value(x):
        y = fn(x)
        return y, y

    jac, y = jax.jacfwd(with_value, has_aux=True)(x)
    check_map_output(where, "fn", jac.shape[:-1], x)
    name = getattr(fn, "__name__", None) or type(fn).__name__
    # NaN from the map is the map's fault: never a Jacobian, singular value or det
    finite = jnp.all(jnp.isfinite(jac))
    if not is_concrete(finite):
        # one check, on J (NaN from the map makes J NaN); a check of fn(x) too would
        # keep more of the computation alive and cost compile time
        return eqx.error_if(
            jac,
            ~finite,
            f"{where}: the Jacobian of fn ({name}) is NaN or inf at x: fn is not finite "
            "there (a division by zero, a log of a non-positive number, a solve that "
            "failed) or not differentiable there (sqrt or abs at 0, a kink). Check fn "
            "at that point.",
        )
    if not bool(jnp.all(jnp.isfinite(y))):
        raise ValueError(
            f"{where}: fn ({name}) returned NaN or inf at x: the map is not finite there "
            "(a division by zero, a log of a non-positive number, a solve that failed), "
            "so it has no Jacobian there. Check fn at that point."
        )
    if not bool(finite):
        raise ValueError(
            f"{where}: the Jacobian of fn ({name}) is NaN or inf at x, though fn is "
            "finite there: fn is not differentiable there (sqrt or abs at 0, a kink), or "
            "its derivative overflows. Move the point or smooth the map."
        )
    return jac


def _norm(v):
    """`|v|`, scaled by `max |v_i|` first, so that it neither under- nor overflows
    (`|(1e-30, 0)|` is `1e-30` in float32, not `0`)."""
    m = jnp.max(jnp.abs(v))
    m = jnp.where(m > 0, m, 1)
    return m * jnp.linalg.norm(v / m)


# The relative accuracy to which `x + n` must carry the perturbation `n`: a smaller
# `n` is partly (or, below `eps |x| / 2`, wholly) rounded away, and `A_F(x, n)` would
# be that of another perturbation.
PERTURBATION_RTOL = 1e-3


def jacobian(fn: Map, x: Float[ArrayLike, "..."]) -> Float[Array, "n n"]:
    """Dense Jacobian `J_F(x)` by forward mode (`jax.jacfwd`: n JVPs).

    For `F = lambda z: jf.generate(field, z)` with an adaptive solver (the
    default) this differentiates the steps taken, whose error control saw `G(z)`
    only: no tolerance bounds the Jacobian's error (14% relative near paper 000's
    Fig. 3 ridge at the default `rtol = 1e-8`). `jf.generate_with_jacobian` puts
    `J_G` under the error control; a fixed-step solver makes the discrete map,
    differentiated exactly, the object measured.

    **Raises:** `ValueError` when `x` is not one finite point `(n,)`, `fn(x)` or
    `J_F(x)` is not finite (under `jit`, errors at run time for these), or `fn(x)`
    has not `x`'s shape (as for every measure here: they are of maps
    `F: R^n -> R^n`).
    """
    return _jacobian(fn, x, "jacobian")


def singular_values(fn: Map, x: Float[ArrayLike, "..."]) -> Float[Array, " n"]:
    """Singular values of `J_F(x)`, descending. **Raises:** as `jacobian`."""
    return dense_singular_values(_jacobian(fn, x, "singular_values"))


def log_abs_det_jacobian(fn: Map, x: Float[ArrayLike, "..."]) -> Float[Array, ""]:
    """`log |det J_F(x)|` from the dense Jacobian (LU, `slogdet`). **Raises:** as
    `jacobian`."""
    return log_abs_det(_jacobian(fn, x, "log_abs_det_jacobian"))


def geometric_mean_singular_value(fn: Map, x: Float[ArrayLike, "..."]) -> Float[Array, ""]:
    """`Ebar_F(x) = (prod_i sigma_i)^(1/n) = |det J_F(x)|^(1/n)` (paper 000 Def. 4.1).

    Computed through `log |det J|` so it neither under- nor overflows for large n.

    **Raises:** as `jacobian`.
    """
    jac = _jacobian(fn, x, "geometric_mean_singular_value")
    return jnp.exp(log_abs_det(jac) / jac.shape[0])


def _check_direction(what, x, name, u):
    """`x` one finite point, `u` a finite non-zero vector of its shape."""
    x = as_point("x", x, what)
    u = jnp.asarray(u)
    if u.shape != x.shape:
        raise ValueError(f"{what}: {name} has shape {u.shape}, x has {x.shape}.")
    u = check_finite(name, u.astype(x.dtype), what)
    return x, check(u, jnp.all(u == 0), f"{what}: {name} must be non-zero.")


def intrinsic_instability(
    fn: Map, x: Float[ArrayLike, "..."], u: Float[ArrayLike, "..."]
) -> Float[Array, ""]:
    """`E_F(x, u) = |J_F(x) u| / |u|` (paper 000 Def. 2.2, eq. 2): one `jax.jvp`.

    `E` does not depend on `|u|`, so `u` is first scaled to `max |u_i| = 1`: a
    direction whose norm would under- or overflow in its dtype gives `E`, not NaN.

    **Raises:** `ValueError` when `x` is not one finite point, `u` is not a finite
    non-zero vector of its shape (an error at run time under `jit`), or `fn(x)` has
    not `x`'s shape.
    """
    where = "intrinsic_instability"
    x, u = _check_direction(where, x, "direction u", u)
    # E does not depend on |u|: scaled to max |u_i| = 1, a direction whose norm
    # under- or overflows (1e-30 in float32) gives E, not NaN
    u = u / jnp.max(jnp.abs(u))
    ju = jax.jvp(fn, (x,), (u,))[1]
    check_map_output(where, "fn", ju.shape, x)
    return _norm(ju) / _norm(u)


def instability_coefficient(
    fn: Map, x: Float[ArrayLike, "..."], n: Float[ArrayLike, "..."]
) -> Float[Array, ""]:
    """`A_F(x, n) = |F(x + n) - F(x)| / |n|` (paper 000 Prop. 2.1, eq. 3).

    `A` depends on the size of `n`, so `n` is used as given, never rescaled; it must
    survive the addition `x + n` in `x`'s dtype. Where `|n|` is near `eps |x|` the
    rounding of `x + n` changes the perturbation (below `eps |x| / 2` it is lost:
    `x + n == x`), so a perturbation that `x + n` carries to less than a relative
    `1e-3` is refused, with the smallest usable size `eps |x| / (2e-3)` (`8.4e-5 |x|`
    in float32, `1.1e-13 |x|` in float64). For the limit of small `n`, use
    `intrinsic_instability` (`E_F(x, n) = lim A_F(x, h n)` as `h -> 0`).

    **Raises:** as `intrinsic_instability`, for the perturbation `n`, and
    `ValueError` (under `jit`, an error at run time) for `n` too small for `x`'s
    dtype at `x`.
    """
    where = "instability_coefficient"
    x, n = _check_direction(where, x, "perturbation n", n)
    moved = x + n
    size, lost = _norm(n), _norm((moved - x) - n)
    eps = float(jnp.finfo(x.dtype).eps)
    usable = eps * _norm(x) / (2 * PERTURBATION_RTOL)
    moved = check(
        moved,
        ~(lost <= PERTURBATION_RTOL * size),
        f"{where}: the perturbation n is too small for {x.dtype} at x: x + n rounds it "
        f"off by more than a relative {PERTURBATION_RTOL:g} (x + n == x for |n| below "
        "eps |x| / 2), so A_F(x, n) would be that of another perturbation. Pass a larger "
        "n (the smallest usable size is |n| = eps |x| / 2e-3), x in float64, or use "
        "intrinsic_instability for the limit of small n.",
        got=lambda: (
            f"|n| = {float(size):.2e}; the smallest usable size here is {float(usable):.1e}"
        ),
    )
    fmoved, fx = fn(moved), fn(x)
    check_map_output(where, "fn", jnp.shape(fx), x)
    return _norm(fmoved - fx) / size


class SegmentBound(eqx.Module):
    """The Prop. E.1 lower bound on `A_F(x, n)` and whether its condition held.

    - `bound`: `(2 sqrt 2 / pi) min_a E_F(x + a n, n)`.
    - `min_intrinsic`: `min_a E_F(x + a n, n)` over the sampled points.
    - `min_inner`: `min_{a,b} <J(x+an) n, J(x+bn) n>` over the sampled pairs.
    - `condition`: `min_inner >= 0`, the hypothesis of Prop. E.1 (checked on the
      sampled points only, as in the paper's appendix E.1).
    """

    bound: Float[Array, ""]
    min_intrinsic: Float[Array, ""]
    min_inner: Float[Array, ""]
    condition: Bool[Array, ""]


def instability_lower_bound(
    fn: Map,
    x: Float[ArrayLike, "..."],
    n: Float[ArrayLike, "..."],
    num_points: int | np.integer = 10,
) -> SegmentBound:
    """Paper 000 Prop. E.1: if `<J(x+an)n, J(x+bn)n> >= 0` for all `a, b in [0, 1]`,
    then `A_F(x, n) >= (2 sqrt 2 / pi) min_a E_F(x + a n, n)`.

    Uses `num_points` equally spaced `a` (the paper uses 10) and exact JVPs instead
    of the paper's finite differences.

    **Raises:** as `intrinsic_instability`, and `ValueError` for `num_points` not an
    int >= 2.
    """
    where = "instability_lower_bound"
    x, n = _check_direction(where, x, "perturbation n", n)
    if check_positive_int("num_points", num_points) < 2:
        raise ValueError(f"num_points must be an int >= 2, got {num_points!r}.")
    a = jnp.linspace(0.0, 1.0, int(num_points), dtype=x.dtype)
    jn = jax.vmap(lambda ai: jax.jvp(fn, (x + ai * n,), (n,))[1])(a)
    check_map_output(where, "fn", jn.shape[1:], x)
    norm_n = jnp.linalg.norm(n)
    e = jnp.linalg.norm(jn, axis=-1) / norm_n
    gram = jn @ jn.T
    min_e = jnp.min(e)
    min_inner = jnp.min(gram)
    return SegmentBound(
        bound=(2 * math.sqrt(2) / math.pi) * min_e,
        min_intrinsic=min_e,
        min_inner=min_inner,
        condition=min_inner >= 0,
    )


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
    x: Float[ArrayLike, "N n"],
    M: Real[ArrayLike, " m"] | Real[ArrayLike, ""] | Sequence[float | int],
    *,
    throw: bool = True,
    **solve_kwargs,
) -> InstabilityProbability | Outcome:
    """Estimate `P_M`, `eps`, `delta` of paper 000 Theorem 4.1 from samples `x`.

    `Ebar_G(G^{-1}(x))` comes from the change-of-variables identity
    `log Ebar = (log p_noise(z) - log p_gen(x)) / n` at `z = G^{-1}(x)` (Lemma D.1),
    which stays exact and cheap in high dimension.

    **Arguments:**

    - `field`: an `AnalyticField` (closed-form `p_gen`).
    - `x`: samples of `pi_real`, shape `(N, n)`, `N >= 1`.
    - `M`: one threshold or several, each finite and `> 0`.
    - `throw`: `False` keeps going when some inversions fail: the statistics are
      over the samples that succeeded, and an `Outcome` holds them with the
      per-sample `result` (`log_ebar` and `noise_norm2` are NaN at failures; the
      fractions are NaN only where no sample succeeded).
    - `**solve_kwargs`: for the inversion, as for `jf.invert`.

    **Returns:** an `InstabilityProbability`; with `throw=False`, an `Outcome`
    holding it.

    **Raises:** `ValueError` for a field that is not an `AnalyticField`, `x` not of
    shape `(N, n)` with `N >= 1` (no samples, no estimate) or, with `throw=True`,
    not finite, and `M` empty, not finite or `<= 0` (under `jit`, the value checks
    raise at run time).
    """
    throw = check_throw(throw)
    where = "instability_probability"
    if not isinstance(field, AnalyticField):
        raise ValueError(f"{where} needs an AnalyticField (closed-form p_gen).")
    # a Monte-Carlo estimate from no samples is undefined: N >= 1 (one is crude, fine)
    x = as_batch("x", x, where, finite=throw)
    if x.shape[1] != field.dim:
        raise ValueError(
            f"{where}: x holds points of length {x.shape[1]}, the field's law has n = {field.dim}."
        )
    M = as_float_array("M", M, ndim=(0, 1))
    M = jnp.atleast_1d(M.astype(x.dtype))
    if M.shape[0] == 0:
        raise ValueError(f"{where}: M is empty; pass one threshold or several.")
    M = check(M, ~(M > 0), f"{where}: M must be > 0 (a threshold on Ebar).")
    n = x.shape[1]
    path = field.path
    law = field.law
    if throw:
        z = jax.vmap(lambda xi: invert(field, xi, **solve_kwargs))(x)
        ok = jnp.ones(x.shape[0], bool)
    else:
        inverted = jax.vmap(lambda xi: invert(field, xi, throw=False, **solve_kwargs))(x)
        z, ok = inverted.value, inverted.ok
    a1, s1 = path.alpha(path.t_noise), path.sigma(path.t_noise)
    a0, s0 = path.alpha(path.t_data), path.sigma(path.t_data)
    log_noise = jax.vmap(lambda zi: law.marginal_log_prob(zi, a1, s1))(z)
    log_gen = jax.vmap(lambda xi: law.marginal_log_prob(xi, a0, s0))(x)
    log_ebar = (log_noise - log_gen) / n
    radius2 = 2 * n + 3 * jnp.sqrt(2.0 * n)
    count = jnp.sum(ok).astype(x.dtype)

    def mean_over_ok(flags):  # the fraction of the samples that succeeded
        return jnp.sum(flags & ok, axis=-1).astype(x.dtype) / count

    p_m = mean_over_ok(log_ebar[None, :] > jnp.log(M)[:, None])
    threshold = -0.5 * n * jnp.log(2 * jnp.pi * M**2) - 0.5 * radius2
    eps = mean_over_ok(log_gen[None, :] >= threshold[:, None])
    norm2 = jnp.sum(z**2, -1)
    delta = mean_over_ok(norm2 > radius2)
    stats = InstabilityProbability(
        M=M,
        p_m=p_m,
        eps=eps,
        delta=delta,
        bound=1 - eps - delta,
        log_ebar=log_ebar,
        noise_norm2=norm2,
    )
    return stats if throw else Outcome(value=stats, result=inverted.result)


def amplified_error_bound(
    step_size: Real[ArrayLike, ""], m2: Real[ArrayLike, ""], c: Real[ArrayLike, "*c"]
) -> Float[Array, "*c"]:
    """Paper 000 Prop. 3.1 (eq. 5): the upper bound `U` on the reconstruction error
    satisfies `U >= h M_2 (C - 1) / (2 log C) * C` when `E_G(z, zhat - z) > C`.

    The first factor is the numerical error of the inverted noise, the second `C`
    the instability amplification. `C = 1` is the removable limit `h M_2 / 2`, and
    `C = 0` the limit `0`.

    **Raises:** `ValueError` (under `jit`, an error at run time) where an argument
    is not finite, `step_size <= 0`, `m2 < 0` or `c < 0`.
    """
    where = "amplified_error_bound"
    step_size = as_float_array("step_size", step_size)
    step_size = check(step_size, ~(step_size > 0), f"{where}: step_size h must be > 0.")
    m2 = as_float_array("m2", m2)
    m2 = check(m2, ~(m2 >= 0), f"{where}: m2 (a bound on a norm) must be >= 0.")
    c = as_float_array("c", c)
    c = check(c, ~(c >= 0), f"{where}: c (an instability coefficient) must be >= 0.")
    safe = jnp.where(jnp.abs(c - 1) < 1e-12, 2.0, c)
    ratio = jnp.where(jnp.abs(c - 1) < 1e-12, 1.0, (safe - 1) / jnp.log(safe))
    return step_size * m2 * ratio / 2 * c
