"""Jacobians of a map `F: R^n -> R^n` and the instability measures of paper 000.

Every function takes `(fn, x, ...)` for any differentiable `fn` (a generation map
`lambda z: jf.generate(field, z)`, a solver step, a user's map); none needs a field.
"""

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

Map = Callable[[Float[Array, " n"]], Float[Array, " n"]]


def _check_point(name, x):
    x = jnp.asarray(x)
    if x.ndim != 1:
        raise ValueError(
            f"{name} takes one point of shape (n,), got {x.shape}; batch with jax.vmap."
        )
    return x


def jacobian(fn: Map, x: Float[Array, " n"]) -> Float[Array, "n n"]:
    """Dense Jacobian `J_F(x)` by forward mode (`jax.jacfwd`: n JVPs)."""
    x = _check_point("jacobian", x)
    return jax.jacfwd(fn)(x)


def singular_values(fn: Map, x: Float[Array, " n"]) -> Float[Array, " n"]:
    """Singular values of `J_F(x)`, descending."""
    return jnp.linalg.svd(jacobian(fn, x), compute_uv=False)


def log_abs_det_jacobian(fn: Map, x: Float[Array, " n"]) -> Float[Array, ""]:
    """`log |det J_F(x)|` from the dense Jacobian (LU, `slogdet`)."""
    return jnp.linalg.slogdet(jacobian(fn, x))[1]


def geometric_mean_singular_value(fn: Map, x: Float[Array, " n"]) -> Float[Array, ""]:
    """`Ebar_F(x) = (prod_i sigma_i)^(1/n) = |det J_F(x)|^(1/n)` (paper 000 Def. 4.1).

    Computed through `log |det J|` so it neither under- nor overflows for large n.
    """
    x = _check_point("geometric_mean_singular_value", x)
    return jnp.exp(log_abs_det_jacobian(fn, x) / x.shape[0])


def _check_direction(what, x, name, u):
    x = _check_point(what, x)
    u = jnp.asarray(u, x.dtype)
    if u.shape != x.shape:
        raise ValueError(f"{what}: {name} has shape {u.shape}, x has {x.shape}.")
    return x, eqx.error_if(u, jnp.all(u == 0), f"{what}: {name} must be non-zero.")


def intrinsic_instability(
    fn: Map, x: Float[Array, " n"], u: Float[Array, " n"]
) -> Float[Array, ""]:
    """`E_F(x, u) = |J_F(x) u| / |u|` (paper 000 Def. 2.2, eq. 2): one `jax.jvp`."""
    x, u = _check_direction("intrinsic_instability", x, "direction u", u)
    ju = jax.jvp(fn, (x,), (u,))[1]
    return jnp.linalg.norm(ju) / jnp.linalg.norm(u)


def instability_coefficient(
    fn: Map, x: Float[Array, " n"], n: Float[Array, " n"]
) -> Float[Array, ""]:
    """`A_F(x, n) = |F(x + n) - F(x)| / |n|` (paper 000 Prop. 2.1, eq. 3)."""
    x, n = _check_direction("instability_coefficient", x, "perturbation n", n)
    return jnp.linalg.norm(fn(x + n) - fn(x)) / jnp.linalg.norm(n)


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
    fn: Map, x: Float[Array, " n"], n: Float[Array, " n"], num_points: int = 10
) -> SegmentBound:
    """Paper 000 Prop. E.1: if `<J(x+an)n, J(x+bn)n> >= 0` for all `a, b in [0, 1]`,
    then `A_F(x, n) >= (2 sqrt 2 / pi) min_a E_F(x + a n, n)`.

    Uses `num_points` equally spaced `a` (the paper uses 10) and exact JVPs instead
    of the paper's finite differences.
    """
    x, n = _check_direction("instability_lower_bound", x, "perturbation n", n)
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2, got {num_points}.")
    a = jnp.linspace(0.0, 1.0, num_points, dtype=x.dtype)
    jn = jax.vmap(lambda ai: jax.jvp(fn, (x + ai * n,), (n,))[1])(a)
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
