"""The largest and smallest singular values of the Jacobian `J = J_F(x)` of a map
`F: R^n -> R^n`, with their singular vectors, matrix-free: `J` only through JVPs
and VJPs (`jacobian_products`).

Paper 000 measures the instability of a generation map `G` by the singular values
of `J_G(z)`: the largest is the worst-case amplification `max_u E_G(z, u)`
(Def. 2.2, Prop. 2.1), and their geometric mean is `Ebar_G(z)` (Def. 4.1,
Theorem 4.1). The dense `jf.singular_values` needs all `n` columns of `J`; here
the top `k` come from a Krylov space of a few blocks.

The algorithm is block Golub-Kahan-Lanczos bidiagonalisation (Golub & Kahan,
"Calculating the singular values and pseudo-inverse of a matrix", SIAM J. Numer.
Anal. B 2(2), 1965; in blocks: Golub, Luk & Overton, "A block Lanczos method for
computing the singular values and corresponding singular vectors of a matrix",
ACM TOMS 7(2), 1981), started from a random block (the randomised block Krylov
method of Musco & Musco, "Randomized block Krylov methods for stronger and faster
approximate singular value decomposition", NeurIPS 2015). From an orthonormal
`n x b` block `V_0`,

    J V_j   = U_{<j} C_j + U_j R_j        (b JVPs, batched)
    J^T U_j = V_{<=j} D_j + V_{j+1} S_j   (b VJPs, batched)

each new block orthonormalised against every earlier one (full
reorthogonalisation: two classical Gram-Schmidt passes, then a within-block
orthonormalisation, twice), so that `U = [U_0 ... U_j]` and `V = [V_0 ... V_j]`
are orthonormal and `B = U^T J V` is block upper bidiagonal. The Ritz triplets
are the SVD of the small `B = X diag(s) Y^T` (Rayleigh-Ritz): `s`, `U X`, `V Y`.
"""

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable
from typing import final

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, Real

from .._linalg import eigh, svd
from .._misc import (
    as_point,
    check,
    check_key,
    check_number,
    check_positive_int,
    describe,
    is_concrete,
)
from .._results import all_finite
from ._operator import GenerationMap, jacobian_products

Map = Callable[[Float[Array, " n"]], Float[Array, " n"]]


@final
class SingularTriplets(eqx.Module):
    """Result of `top_singular_values` / `smallest_singular_values`: `k` singular
    triplets `J v_i = s_i u_i`, `J^T u_i = s_i v_i` of a Jacobian `J`.

    - `values`: `(k,)` the singular values `s_i`: descending for the largest,
      ascending (smallest first) for the smallest.
    - `left`: `(n, k)` unit left singular vectors `u_i`, column `i` for `values[i]`.
    - `right`: `(n, k)` unit right singular vectors `v_i` (the input directions:
      `|J v_i| = s_i`).
    - `residuals`: `(k,)` an upper bound (up to round-off) on
      `max(|J v_i - s_i u_i|, |J^T u_i - s_i v_i|)` for `top_singular_values`; for
      `smallest_singular_values`, the same of the inverse problem,
      `max(|J^{-1} u_i - v_i / s_i|, |J^{-T} v_i - u_i / s_i|)`. Some singular
      value of `J` lies within `residuals[i]` of `values[i]` (of `J^{-1}` within
      `residuals[i]` of `1 / values[i]`).
    - `iterations`: the number of block Krylov steps taken; each costs
      `block_size` JVPs and `block_size` VJPs, batched.
    - `converged`: `(k,)` whether each triplet met the tolerance,
      `residuals[i] <= tol * s_max` (`s_max` the largest Ritz value of the map
      the Krylov space was built for); for `smallest_singular_values`, also
      whether it passed the certificate below.
    - `forward_errors`: `smallest_singular_values` only (`None` for
      `top_singular_values`, whose residuals come from products with `J` itself):
      `(k,)` the relative mismatch `| |J v_i| - s_i | / s_i` of one JVP of `fn` per
      returned right vector, which must be at most `tol * s_i / s_1` (the
      stopping rule's bound on the inverse problem, `s_1 = values[0]`) plus a
      round-off allowance `100 eps |J w| / (|w| s_i)`.
    - `round_trip_error`: `smallest_singular_values` only: the Jacobian round trip
      `|J_inverse(fn(x)) J_fn(x) w - w| / |w|` for one random `w` (drawn from a
      key derived from `key`), which must be at most `tol` plus
      `100 eps |J w| / (|w| s_1)`. With `J_inverse J_fn = I + E`, every singular
      value of the inverse's Jacobian is within a relative `|E|_2` of that of
      `J_fn^{-1}`, and this estimates `|E w|`:
      it catches an inexact inverse (a fixed-step solve of `G^{-1}`, which does not
      invert the same solve of `G`) and a pseudo-inverse, which the forward check
      alone can miss.
    """

    values: Float[Array, " k"]
    left: Float[Array, "n k"]
    right: Float[Array, "n k"]
    residuals: Float[Array, " k"]
    iterations: Int[Array, ""]
    converged: Bool[Array, " k"]
    forward_errors: Float[Array, " k"] | None = None
    round_trip_error: Float[Array, ""] | None = None


# Steps of the block Krylov space when `max_iterations` is not given (at most as
# many as fill the whole space, `ceil(n / block_size)`).
DEFAULT_MAX_ITERATIONS = 20


def default_tolerance(dtype) -> float:
    """`1e-8` in float64, `1e-4` in float32, `max(1e-4, 10 eps)` in a coarser dtype."""
    eps = float(jnp.finfo(dtype).eps)
    if eps <= 1e-15:
        return 1e-8
    return max(1e-4, 10 * eps)


def top_singular_values(
    fn: Map,
    x: Float[ArrayLike, " n"],
    k: int | np.integer,
    *,
    key: PRNGKeyArray,
    tol: Real[ArrayLike, ""] | None = None,
    max_iterations: int | np.integer | None = None,
    block_size: int | np.integer | None = None,
) -> SingularTriplets:
    """The `k` largest singular values of `J = J_F(x)`, with their left and right
    singular vectors, matrix-free, by block Golub-Kahan-Lanczos bidiagonalisation
    with full reorthogonalisation and Rayleigh-Ritz (Golub & Kahan 1965; Golub,
    Luk & Overton 1981; Musco & Musco 2015).

    Paper 000's worst-case amplification of `G` at `z` is the largest singular
    value of `J_G(z)` (Def. 2.2, Prop. 2.1: `max_u E_G(z, u) = s_1`, reached at
    the right singular vector `v_1`); Def. 4.1 and Theorem 4.1 concern the product
    of all of them. This is the matrix-free counterpart of the dense
    `jf.singular_values` for `n` too large to form `J`.

    From a random orthonormal block `V_0` of `b = block_size` columns, each step
    pushes the latest block through `J` (`b` JVPs, batched with `jax.vmap`) and the
    new left block back through `J^T` (`b` VJPs, batched), orthonormalising every
    new block against all earlier ones; the Ritz triplets are the SVD of the small
    projected matrix `B = U^T J V` (`U`, `V` the orthonormal bases). It stops when
    every wanted triplet's residual `max(|J v - s u|, |J^T u - s v|)` is at most
    `tol * s_1`, when the Krylov space fills `R^n` (then the values are exact to
    round-off), or after `max_iterations` steps. The residuals come from the
    products themselves (the part of `J^T U` outside `V`, any part of a block lost
    as numerically dependent, and the difference between the JVP and VJP sides of
    `B`), so no extra product is spent on them and a map whose VJP is not the
    transpose of its JVP does not converge.

    Convergence is fast when the wanted values stand apart from the `b - k`
    values after them: the error falls roughly like
    `(1 + 2 sqrt(gap))^(-2 j)` after `j` steps, `gap = s_k / s_{b+1} - 1`
    (Musco & Musco 2015, Theorem 1). A larger block costs more products per step
    but, batched, little more wall time, and widens the gap.

    `fn` is a `jf.generation_map(field, ...)` (JVPs by forward mode, VJPs through
    its checkpointed reverse solve) or any differentiable map (linearised once,
    its VJP the transpose). Everything runs under `jit` (`k`, `block_size`,
    `max_iterations` static; the map may be a traced argument of
    `eqx.filter_jit`). The bases take `(2 max_iterations + 1) * block_size * n`
    numbers.

    **Arguments:**

    - `fn`: the map `F: R^n -> R^n`.
    - `x`: one point `(n,)`.
    - `k`: the number of singular values, `1 <= k <= n`.
    - `key`: one PRNG key (the starting block).
    - `tol`: relative residual tolerance (> 0); default `1e-8` in float64, `1e-4`
      in float32 (after `x`'s dtype).
    - `max_iterations`: the most block steps; default
      `min(20, ceil(n / block_size))` (the latter fills the whole space).
    - `block_size`: the block's columns, `>= k` (capped at `n`); default
      `k + max(k, 5)`.

    **Returns:** a `SingularTriplets` with `values` descending.

    **Raises:** `ValueError` for `x` not one finite point `(n,)`, `fn(x)` or its
    Jacobian products not finite (NaN from the map is an error naming it, never a
    value; under `jit`, errors at run time for these), `fn` not callable, `fn(x)`
    not of `x`'s shape, `k` not an int in `[1, n]`, a `key` that is not one PRNG
    key, `tol` not a positive number, `max_iterations` not a positive int, or
    `block_size` not an int `>= k`.
    """
    where = "top_singular_values"
    return _top(fn, x, k, key, tol, max_iterations, block_size, where)


def smallest_singular_values(
    fn: Map,
    x: Float[ArrayLike, " n"],
    k: int | np.integer,
    *,
    key: PRNGKeyArray,
    inverse: Map | None = None,
    tol: Real[ArrayLike, ""] | None = None,
    max_iterations: int | np.integer | None = None,
    block_size: int | np.integer | None = None,
) -> SingularTriplets:
    """The `k` smallest singular values of `J = J_F(x)`, with their singular
    vectors, as the reciprocals of the `k` largest of the inverse map's Jacobian:
    `J_F(x)^{-1} = J_{F^{-1}}(F(x))`, so if `J_{F^{-1}}(F(x)) v = s u` then
    `J_F(x) u = (1 / s) v` (the left and right vectors swap).

    For a generation map `G` the smallest singular values of `J_G(z)` are where
    it contracts most, and with the largest they set its conditioning and the
    geometric mean `Ebar_G` of paper 000 (Def. 4.1, Theorem 4.1). This route is
    the better one when `J` is ill-conditioned: Lanczos on `J` itself finds its
    small singular values slowly (they are not separated relative to the
    largest) and, below `eps * s_1`, not at all (round-off hides them), whereas
    they are the largest, well separated values of `J^{-1}`, converged to a
    relative accuracy.

    The route is only as good as the inverse: the Jacobian of the solved `G^{-1}`
    is that of the inverse of the solved `G` only up to the solver's error (Euler
    inversion does not invert Euler generation: at 20 steps on a 2-D mixture the
    smallest value came out 14% off), and a pseudo-inverse or a rescaled
    `inverse=` gives the values of another Jacobian. So the result is certified
    against `fn` itself, cheaply: one JVP of `fn` per returned vector gives
    `|J v_i|`, which must equal `values[i]` (`forward_errors`), and a Jacobian round
    trip `J_inverse(fn(x)) J_fn(x) w` must return a random `w` (`round_trip_error`;
    the check that catches a pseudo-inverse, which a round trip of points,
    `inverse(fn(x)) = x`, misses), both within the stopping rule's tolerance
    (`SingularTriplets` gives the bounds). A triplet that fails is not
    `converged`. Called outside `jit`, a failed certificate also warns
    (`RuntimeWarning`), naming the likely cause and the mismatch: a warning, not an
    error, because the values are still exactly those of the inverse map's
    Jacobian, which may be what is wanted (the solved `G^{-1}`'s own
    conditioning); under `jit`, read `converged`, `forward_errors` and
    `round_trip_error`. To pass, tighten the inverse: an adaptive solver with
    tight `rtol`/`atol`, or more steps.

    `fn` is a `jf.generation_map(field, ...)` (its inverse is built with the same
    field and settings, `inverse` flipped), or any invertible differentiable map
    with its inverse given as `inverse`. Costs one evaluation of `fn` (at `x`),
    what `top_singular_values` costs on the inverse map at `fn(x)`, and for the
    certificate `k + 1` JVPs of `fn` (batched) and one of the inverse; runs
    under `jit` as it does.

    **Arguments:**

    - `fn`: the map `F` (a `GenerationMap`, or any map with `inverse`).
    - `x`: one point `(n,)` (for `G`, the noise `z`).
    - `k`: the number of singular values, `1 <= k <= n`.
    - `key`: one PRNG key (the starting block).
    - `inverse`: `F^{-1}`; required unless `fn` is a `GenerationMap`, where it must
      be left out.
    - `tol`, `max_iterations`, `block_size`: as for `top_singular_values`, for
      the inverse problem (`tol` relative to the largest singular value of
      `J^{-1}`, i.e. `1 / values[0]`).

    **Returns:** a `SingularTriplets` with `values` ascending (smallest first),
    `left` / `right` the singular vectors of `J_F(x)`, `residuals` those of
    the inverse problem (`|J^{-1} u_i - v_i / s_i|` ...; the relative error of
    `values[i]` is at most about `residuals[i] * values[i]`), and the
    certificate's `forward_errors` and `round_trip_error`.

    **Warns:** `RuntimeWarning` when, outside `jit`, the certificate fails.

    **Raises:** as `top_singular_values` (for `fn` and `inverse` alike: NaN from
    either is an error naming it), and `ValueError` for `inverse` missing (or not
    callable) with a plain map, or given with a `GenerationMap`.
    """
    where = "smallest_singular_values"
    if isinstance(fn, GenerationMap):
        if inverse is not None:
            raise ValueError(
                f"{where}: a GenerationMap builds its own inverse (the same field and "
                "settings, inverse flipped); leave inverse= out."
            )
        inverse = dataclasses.replace(fn, inverse=not fn.inverse)
    elif inverse is None or not callable(inverse):
        raise ValueError(
            f"{where}: pass the inverse map as inverse= (a function of one point), got "
            f"{describe(inverse)}; for a generation map pass jf.generation_map(field, ...), "
            "which builds its inverse."
        )
    elif not callable(fn):
        raise ValueError(f"{where}: fn must be a map of one point, got {describe(fn)}.")
    x = as_point("x", x, where)
    n = x.shape[0]
    # check the arguments before the solve at x
    _check_settings(where, n, k, tol, max_iterations, block_size)
    check_key("key", key)
    y = jnp.asarray(fn(x))
    if y.shape != x.shape:
        raise ValueError(
            f"{where}: fn must map a point of shape {x.shape} to the same shape, got "
            f"shape {y.shape}."
        )
    y = check(y.astype(x.dtype), ~jnp.isfinite(y), _not_finite_message(where, "fn", fn))
    top = _top(inverse, y, k, key, tol, max_iterations, block_size, where, name="inverse")
    if tol is None:
        tol = default_tolerance(x.dtype)
    # the round trip's direction: a key of its own, apart from the Krylov start's
    forward_errors, round_trip, certified = _certify(
        fn, inverse, x, y, 1 / top.values, top.left, jax.random.fold_in(key, 1), jnp.asarray(tol)
    )
    result = SingularTriplets(
        values=1 / top.values,
        left=top.right,
        right=top.left,
        residuals=top.residuals,
        iterations=top.iterations,
        converged=top.converged & certified,
        forward_errors=forward_errors,
        round_trip_error=round_trip,
    )
    if is_concrete(certified) and not bool(np.all(np.asarray(certified))):
        warnings.warn(_uncertified_message(result, tol), RuntimeWarning, stacklevel=2)
    return result


# The round-off allowance of the certificate, in units of `eps |J w| / (|w| s_i)`:
# a product with `J` computes `|J v|` to about `eps |J|`, and `|J w| / |w|` is a
# lower estimate of `|J|`.
ROUND_OFF = 100


@eqx.filter_jit
def _certify(fn, inverse, x, y, values, right, key, tol):
    """`(forward_errors, round_trip_error, passed)`: the checks of the smallest
    triplets against the forward map (`SingularTriplets`), from `k + 1` JVPs of
    `fn` at `x` (batched: `J v_i` and `J w`) and one JVP of `inverse` at
    `y = fn(x)` (`J_inverse (J w)`)."""
    dtype = values.dtype
    w = jax.random.normal(key, x.shape, dtype)
    tangents = jnp.concatenate([right, w[:, None]], axis=1)

    def jvp(t):  # jvp, not linearize: a while loop's linearisation solves twice
        return jax.jvp(fn, (x,), (t,))[1]

    products = jax.vmap(jvp, in_axes=1, out_axes=1)(tangents.astype(x.dtype)).astype(dtype)
    jv, jw = products[:, :-1], products[:, -1]
    back = jax.jvp(inverse, (y,), (jw.astype(y.dtype),))[1].astype(dtype)
    norm_w = jnp.linalg.norm(w)
    round_off = ROUND_OFF * jnp.finfo(dtype).eps * jnp.linalg.norm(jw) / norm_w / values
    tol = jnp.asarray(tol, dtype)

    def finite(e):  # an error that is NaN (an infinite value) fails as inf
        return jnp.where(jnp.isnan(e), jnp.inf, e)

    forward = finite(jnp.abs(jnp.linalg.norm(jv, axis=0) - values) / values)
    round_trip = finite(jnp.linalg.norm(back - w) / norm_w)
    passed = (forward <= tol * values / values[0] + round_off) & (round_trip <= tol + round_off[0])
    return forward, round_trip, passed


def _uncertified_message(result, tol) -> str:
    forward = np.asarray(result.forward_errors)
    return (
        "smallest_singular_values: the result failed its certificate against the "
        "forward map fn, so converged is False: |J v_i| differs from values[i] by up "
        f"to {float(np.max(forward)):.2e} (relative), and the Jacobian round trip "
        f"J_inverse(fn(x)) J_fn(x) w misses w by {float(result.round_trip_error):.2e} "
        f"(relative; the tolerance is tol = {float(tol):.1e}, plus round-off). The likely cause "
        "is an inexact inverse: the inverse map is not the inverse of fn to that "
        "accuracy. For a generation map, a fixed-step solver (euler, few steps) "
        "inverts its own generation only up to its error: use an adaptive solver "
        "(solver='dopri5' with tight rtol/atol) or more steps, or pass a larger tol if "
        "that accuracy is enough. For inverse=, pass the exact inverse (a "
        "pseudo-inverse or a rescaled map gives the values of another Jacobian). "
        "The values returned are those of the inverse map's Jacobian; "
        "forward_errors and round_trip_error hold the measured mismatch."
    )


def _map_label(fn) -> str:
    if isinstance(fn, GenerationMap):
        return "an inverse generation map" if fn.inverse else "a generation map"
    return getattr(fn, "__name__", None) or type(fn).__name__


def _not_finite_message(where, name, fn) -> str:
    return (
        f"{where}: {name} ({_map_label(fn)}) returned NaN or inf at the point it was "
        "given: the map is not finite there (a division by zero, a log of a "
        "non-positive number, a field or network that is NaN there), so it has no "
        f"singular values there. Check {name} at that point."
    )


def _check_settings(where, n, k, tol, max_iterations, block_size):
    """`(k, block_size, max_iterations)` as ints, checked; `tol` checked."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"{where}: k must be an int in [1, n = {n}], got {k!r}.")
    k = int(k)
    if block_size is None:
        b = k + max(k, 5)
    else:
        b = check_positive_int("block_size", block_size)
        if b < k:
            raise ValueError(
                f"{where}: block_size must be >= k = {k} (the block holds the wanted "
                f"vectors), got {b}; leave it out for k + max(k, 5)."
            )
    b = min(b, n)
    full = math.ceil(n / b)
    if max_iterations is None:
        q = min(DEFAULT_MAX_ITERATIONS, full)
    else:
        q = min(check_positive_int("max_iterations", max_iterations), full)
    if tol is not None:
        check_number("tol", tol, 0, open_low=True)
    return k, b, q


def _top(fn, x, k, key, tol, max_iterations, block_size, where, name="fn"):
    """The top `k` triplets, checked finite."""
    x = as_point("x", x, where)
    n = x.shape[0]
    k, b, q = _check_settings(where, n, k, tol, max_iterations, block_size)
    check_key("key", key)
    if tol is None:
        tol = default_tolerance(x.dtype)
    else:
        tol = check_number("tol", tol, 0, open_low=True)
    result, output_finite = _top_compiled(fn, x, key, jnp.asarray(tol), k, b, q, where)
    # NaN from the map is the map's fault, never a singular value: an error naming it
    label = f"{name} ({_map_label(fn)})"
    products_finite = all_finite(result.values)
    if not is_concrete(products_finite):
        # one check, on the values (NaN from the map makes its products NaN); a check
        # of fn(x) too would keep more of the solve alive and cost compile time
        values = eqx.error_if(
            result.values,
            ~products_finite,
            f"{where}: the Jacobian products of {label} are NaN or inf at the point it "
            f"was given: {name} is not finite there (a division by zero, a log of a "
            "non-positive number, a field or network that is NaN there) or not "
            "differentiable there (sqrt or abs at 0, a kink). Check it at that point.",
        )
        return eqx.tree_at(lambda r: r.values, result, values)
    if not bool(output_finite):
        raise ValueError(_not_finite_message(where, name, fn))
    if not bool(products_finite):
        raise ValueError(
            f"{where}: the Jacobian products of {label} are NaN or inf at the point it "
            f"was given, though {name} is finite there: it is not differentiable there "
            "(sqrt or abs at 0, a kink), or its derivative overflows. Move the point or "
            "smooth the map."
        )
    return result


@eqx.filter_jit
def _top_compiled(fn, x, key, tol, k, b, q, where):
    """The products and the Krylov loop in one compiled program (called eagerly,
    not op by op; inlined under an outer `jit`): `_block_lanczos`'s results and
    whether `fn(x)` is finite."""
    y, jvp, vjp = jacobian_products(fn, x, where)
    # small dtypes (float16, bfloat16) compute the linear algebra in float32
    dtype = jnp.promote_types(x.dtype, jnp.float32)

    def jvps(v):
        return jax.vmap(jvp, in_axes=1, out_axes=1)(v.astype(x.dtype)).astype(dtype)

    def vjps(u):
        return jax.vmap(vjp, in_axes=1, out_axes=1)(u.astype(x.dtype)).astype(dtype)

    result = _block_lanczos(jvps, vjps, x.shape[0], dtype, k, b, q, tol.astype(dtype), key)
    return result, jnp.all(jnp.isfinite(y))


def _bucket_sizes(num_blocks: int) -> tuple[int, ...]:
    """Sizes (in blocks) of the bases the linear algebra is specialised to: powers
    of two below `num_blocks`, then `num_blocks`, so that a step's work is at most
    twice what its filled part needs."""
    sizes, s = [], 1
    while s < num_blocks:
        sizes.append(s)
        s *= 2
    return (*sizes, num_blocks)


def _switch(active, sizes, branch, *operands):
    """`branch(size, *operands)` for the smallest `size` in `sizes` that holds
    `active` blocks (`lax.switch`: one compiled branch per size)."""
    if len(sizes) == 1:
        return branch(sizes[0], *operands)
    index = jnp.clip(jnp.searchsorted(jnp.asarray(sizes), active), 0, len(sizes) - 1)
    return jax.lax.switch(index, [functools.partial(branch, s) for s in sizes], *operands)


def _orthonormal(p, threshold):
    """An orthonormal basis of the columns of `p` from the eigendecomposition of
    their Gram matrix: the directions with eigenvalue above `threshold` (others
    become zero columns)."""
    lam, vec = eigh(p.T @ p)
    keep = lam > threshold
    scale = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1)), 0)
    return p @ (vec * scale)


def _extend(basis, p, floor):
    """Orthonormalise the block `p` against the orthonormal (or zero) columns of
    `basis` and within itself.

    Returns `(coef, rest, q)`: `coef = basis^T p` (two classical Gram-Schmidt
    passes), `rest = p - basis coef` and `q` an orthonormal basis of `rest`'s
    directions above `floor` (zero columns for the others), orthogonal to `basis`
    (re-projected and orthonormalised a second time).
    """
    c1 = basis.T @ p
    rest = p - basis @ c1
    c2 = basis.T @ rest
    rest = rest - basis @ c2
    q = _orthonormal(rest, floor**2)
    q = q - basis @ (basis.T @ q)
    return c1 + c2, rest, _orthonormal(q, 0.25)


def _column_norms(a):
    return jnp.sqrt(jnp.sum(a * a, axis=0))


def _block_lanczos(jvps, vjps, n, dtype, k, b, q, tol, key) -> SingularTriplets:
    """Block Golub-Kahan-Lanczos with full reorthogonalisation: `q` steps at most
    of block size `b`, stopping once the top `k` Ritz triplets meet `tol`."""
    m = q * b
    eps = jnp.finfo(dtype).eps
    sizes = _bucket_sizes(q)
    rows = jnp.arange(m)
    start = jax.random.normal(key, (n, b), dtype)
    start = _orthonormal(_orthonormal(start, 100 * eps * n * b), 0.25)

    def step(state):
        j, u, v, bj, bt, dn1, dn2, rest_v, scale = state[:9]
        col = j * b
        # J V_j against U_{<j}: the column block j of B = U^T J V
        w = jvps(jax.lax.dynamic_slice_in_dim(v, col, b, axis=1))
        scale = jnp.maximum(scale, jnp.max(_column_norms(w)))
        floor = jnp.maximum(100 * eps * scale, jnp.finfo(dtype).tiny)

        def extend_u(size, u, w, floor):
            coef, rest, uj = _extend(u[:, : size * b], w, floor)
            return jnp.zeros((m, b), dtype).at[: size * b].set(coef), rest, uj

        coef, rest, uj = _switch(j, sizes, extend_u, u, w, floor)
        u = jax.lax.dynamic_update_slice_in_dim(u, uj, col, axis=1)
        coef = jnp.where((rows < col)[:, None], coef, 0)
        coef = jax.lax.dynamic_update_slice_in_dim(coef, uj.T @ w, col, axis=0)
        bj = jax.lax.dynamic_update_slice_in_dim(bj, coef, col, axis=1)
        # the part of J V_j that U misses (directions dropped as dependent)
        dn1 = jax.lax.dynamic_update_slice_in_dim(
            dn1, _column_norms(rest - uj @ (uj.T @ rest)), col, axis=0
        )

        # J^T U_j against V_{<=j}: the row block j of B again, from the VJPs
        z = vjps(uj)
        scale = jnp.maximum(scale, jnp.max(_column_norms(z)))
        floor = jnp.maximum(100 * eps * scale, jnp.finfo(dtype).tiny)

        def extend_v(size, v, z, floor):
            coef, rest, vn = _extend(v[:, : size * b], z, floor)
            return jnp.zeros((m + b, b), dtype).at[: size * b].set(coef), rest, vn

        coef, rest_v, vn = _switch(j + 1, sizes, extend_v, v, z, floor)
        v = jax.lax.dynamic_update_slice_in_dim(v, vn, col + b, axis=1)
        coef = jnp.where((jnp.arange(m + b) < col + b)[:, None], coef, 0)
        coef = jax.lax.dynamic_update_slice_in_dim(coef, (vn.T @ z), col + b, axis=0)
        bt = jax.lax.dynamic_update_slice_in_dim(bt, coef.T, col, axis=0)
        dn2 = jax.lax.dynamic_update_slice_in_dim(
            dn2, _column_norms(rest_v - vn @ (vn.T @ rest_v)), col, axis=0
        )

        # Rayleigh-Ritz on the filled part of B
        def ritz(size, bj):
            s = size * b
            x, sv, yt = svd(bj[:s, :s])
            pad = jnp.zeros((m, k), dtype)
            return sv[:k], pad.at[:s].set(x[:, :k]), pad.at[:s].set(yt[:k].T)

        sv, xs, ys = _switch(j + 1, sizes, ritz, bj)
        active = rows < col + b
        # |J V y - s U x| <= sum over columns of V of the part of J V outside U
        r1 = jnp.abs(dn1) @ jnp.abs(ys)
        # J^T U x - s V y = V (B'^T - B^T) x + rest_v x_j + earlier dropped parts
        diff = jnp.where(active[None, :], bt[:, :m] - bj, 0)
        r2 = (
            _column_norms(diff.T @ xs)
            + _column_norms(rest_v @ jax.lax.dynamic_slice_in_dim(xs, col, b, axis=0))
            + jnp.where(rows < col, dn2, 0) @ jnp.abs(xs)
        )
        res = jnp.maximum(r1, r2)
        ok = res <= tol * sv[0]
        exhausted = jnp.all(vn == 0)
        done = jnp.all(ok) | exhausted
        return (j + 1, u, v, bj, bt, dn1, dn2, rest_v, scale, sv, xs, ys, res, ok, done)

    def cond(state):
        return (state[0] < q) & ~state[-1]

    zeros = functools.partial(jnp.zeros, dtype=dtype)
    init = (
        jnp.zeros((), jnp.int32),
        zeros((n, m)),
        zeros((n, m + b)).at[:, :b].set(start),
        zeros((m, m)),
        zeros((m, m + b)),
        zeros((m,)),
        zeros((m,)),
        zeros((n, b)),
        zeros(()),
        zeros((k,)),
        zeros((m, k)),
        zeros((m, k)),
        jnp.full((k,), jnp.inf, dtype),
        jnp.zeros((k,), bool),
        jnp.zeros((), bool),
    )
    j, u, v, *_, sv, xs, ys, res, ok, _ = jax.lax.while_loop(cond, step, init)
    return SingularTriplets(
        values=sv,
        left=u @ xs,
        right=v[:, :m] @ ys,
        residuals=res,
        iterations=j,
        converged=ok,
    )
