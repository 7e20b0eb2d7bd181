"""Stochastic trace estimators of a linear map given only as a matvec
`v -> A v`: Hutchinson's and Hutch++, each with the standard error of its
random part.

- Hutchinson (1990): `tr(A) ~ (1/m) sum_i g_i^T A g_i` with Rademacher probes
  `g_i`; unbiased, variance `2 ||A||_F^2 - 2 sum_i A_ii^2` for symmetric `A` (so
  exact for a diagonal `A`), error `O(1/sqrt(m))`.
- Hutch++ (Meyer, Musco, Musco & Woodruff, "Hutch++: optimal stochastic trace
  estimation", SOSA 2021, Algorithm 1): a sketch `S` (`k` Rademacher columns),
  `Q = orth(A S)`, then
  `tr(A) ~ tr(Q^T A Q) + (1/m) sum_i g_i^T (I - QQ^T) A (I - QQ^T) g_i`.
  The first term is exact and takes the top of `A`'s spectrum; Hutchinson only
  sees the residual, whose Frobenius norm is small when the spectrum decays:
  error `O(1/m)` instead of `O(1/sqrt(m))` for PSD `A`. Unbiased for any `A`
  given any `S` (`E[g^T P A P g] = tr(P A P) = tr(A P)` and
  `tr(Q^T A Q) = tr(A QQ^T)`), as `S` and the `g_i` are independent.

The standard error is that of the Hutchinson part: `std(r_i) / sqrt(m)` with
the sample standard deviation (`ddof=1`) of the `m` per-probe values `r_i`
(for Hutch++, of the residual terms, conditional on `S`).
"""

from collections.abc import Callable
from typing import final

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._linalg import eigh
from .._misc import check_key, check_positive_int, describe

_TRACE_METHODS = ("hutch++", "hutchinson")


@final
class Estimate(eqx.Module):
    """A Monte Carlo estimate and its standard error.

    - `value`: the estimate.
    - `stderr`: its standard error, `std / sqrt(m)` from the sample standard
      deviation (`ddof=1`) of the `m` i.i.d. per-probe values that make up its
      random part (zero where nothing is random, e.g. a Hutch++ sketch that spans
      the whole space). An approximate 95% interval is `value +- 2 stderr`.
    """

    value: Float[Array, "..."]
    stderr: Float[Array, "..."]


def mean_and_stderr(samples: Float[Array, "... m"]) -> tuple[Array, Array]:
    """Mean over the last axis and its standard error `std(ddof=1) / sqrt(m)`."""
    m = samples.shape[-1]
    mean = jnp.mean(samples, axis=-1)
    var = jnp.sum((samples - mean[..., None]) ** 2, axis=-1) / (m - 1)
    return mean, jnp.sqrt(var / m)


def gaussian(key, shape, dtype) -> Array:
    """Standard normal draws, the same numbers (to rounding) in every dtype: drawn
    in float32, so a float32 and a float64 run from one key share the sketch."""
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def rademacher(key, shape, dtype) -> Array:
    """Rademacher (+-1) entries."""
    return jax.random.rademacher(key, shape, dtype=dtype)


def orthonormal_range(ys: Float[Array, "k n"]) -> Float[Array, "k n"]:
    """Rows `Q^T` with `Q Q^T` the orthogonal projector onto the row space of `ys`
    (numerically: its directions above `10 k eps` of the largest, relative to the
    Gram matrix; the others become zero rows).

    From the eigendecomposition of the `k x k` Gram matrix `ys ys^T = V L V^T`,
    `Q^T = L^(-1/2) V^T ys`, done twice (as CholeskyQR2: the second pass restores
    the orthogonality the first loses to the squared condition number). It costs
    two `k x n` products and two `k x k` eigendecompositions, where a Householder
    QR of the tall `n x k` matrix is much slower on CPU, and it tolerates a
    rank-deficient `ys` (any orthonormal `Q` independent of the probes keeps
    Hutch++ unbiased).
    """
    k = ys.shape[0]
    tol = 10 * k * jnp.finfo(ys.dtype).eps
    for _ in range(2):
        lam, vec = eigh(ys @ ys.T)
        keep = lam > tol * jnp.max(lam)
        scale = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1)), 0)
        ys = (vec * scale).T @ ys
    return ys


def hutchinson_terms(matvec, probes: Float[Array, "m n"]) -> Float[Array, " m"]:
    """`g_i^T A g_i` per probe row `g_i`, with `matvec` vmapped over the probes."""
    return jnp.sum(probes * jax.vmap(matvec)(probes), axis=-1)


def hutchpp_terms(
    matvec, sketch: Float[Array, "k n"], probes: Float[Array, "m n"]
) -> tuple[Float[Array, ""], Float[Array, " m"]]:
    """Hutch++'s two parts with sketch rows `S` and probe rows `g_i`:
    `(tr(Q^T A Q), [g_i^T P A P g_i]_i)`, `Q = orth(A S)`, `P = I - QQ^T`.

    Costs `2k + m` matvecs. Both parts depend on `Q` only through the projector
    `QQ^T`, so they are smooth where `A` is and `A S` keeps its rank (the sign
    conventions of QR do not matter): the trajectory integrates them.
    """
    qt = orthonormal_range(jax.vmap(matvec)(sketch))
    exact = jnp.sum(qt * jax.vmap(matvec)(qt))
    projected = probes - (probes @ qt.T) @ qt
    return exact, hutchinson_terms(matvec, projected)


def check_method(where: str, method) -> str:
    if method not in _TRACE_METHODS:
        raise ValueError(f"{where}: method must be one of {_TRACE_METHODS}, got {method!r}.")
    return method


def check_float_dtype(where: str, dtype):
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{where}: dtype must be a floating dtype (jnp.float32, jnp.float64), got {dtype!r}."
        )
    return dtype


def hutchpp_split(where: str, num_matvecs: int, n: int) -> tuple[int, int]:
    """`(k, m)`: sketch columns and residual probes of Hutch++ for a budget of
    `num_matvecs = 2k + m` matvecs, `k = num_matvecs // 3` as in Meyer et al.
    (at most `n`: a sketch of `n` columns spans the space), `m >= 2`."""
    if num_matvecs < 4:
        raise ValueError(
            f"{where}: method='hutch++' needs num_matvecs >= 4 (one sketch column, its "
            f"product, and two probes for a standard error), got {num_matvecs}."
        )
    k = min(num_matvecs // 3, n)
    return k, num_matvecs - 2 * k


def trace_estimate(
    matvec: Callable[[Float[Array, " n"]], Float[Array, " n"]],
    n: int | np.integer,
    *,
    key: PRNGKeyArray,
    num_matvecs: int | np.integer,
    method: str = "hutch++",
    dtype=None,
) -> Estimate:
    """`tr(A)` of a linear map `A: R^n -> R^n` known only through `matvec(v) = A v`,
    by Hutch++ or Hutchinson's estimator, with its standard error.

    - `'hutchinson'`: `(1/m) sum_i g_i^T A g_i`, `m = num_matvecs` Rademacher
      probes (Hutchinson 1990). `stderr = std(g_i^T A g_i) / sqrt(m)`.
    - `'hutch++'` (default): Meyer, Musco, Musco & Woodruff (2021), Algorithm 1:
      `k = num_matvecs // 3` Gaussian sketch columns `S` (full rank almost
      surely; a Rademacher sketch in few dimensions repeats columns),
      `Q = orth(A S)`,
      `tr(Q^T A Q)` exactly, plus Hutchinson with `m = num_matvecs - 2k` probes on
      the residual `(I - QQ^T) A (I - QQ^T)`. `stderr` is that of the residual
      term (the sketch part is exact given `S`). Much smaller variance than
      Hutchinson at the same cost where `A`'s spectrum decays; larger where `A` is
      nearly diagonal (Hutchinson with Rademacher probes is exact for a diagonal
      `A`, and the projection spoils that).

    Both are unbiased. `matvec` is called under `jax.vmap` over probes (any JAX
    function of one vector is); everything runs under `jit` with `n`,
    `num_matvecs`, `method` and `dtype` static.

    **Arguments:**

    - `matvec`: `v -> A v` for `v` of shape `(n,)`.
    - `n`: the dimension (a positive int).
    - `key`: one PRNG key (the probes and the sketch).
    - `num_matvecs`: the total number of products with `A` (>= 2 for
      `'hutchinson'`, >= 4 for `'hutch++'`).
    - `method`: `'hutch++'` or `'hutchinson'`.
    - `dtype`: the probes' floating dtype; `None` for the default float
      (float64 with `jax_enable_x64`, else float32).

    **Returns:** an `Estimate(value, stderr)` of `tr(A)`.

    **Raises:** `ValueError` for a `matvec` that is not callable, `n` or
    `num_matvecs` not a positive int (or too small for the method), an unknown
    `method`, a non-floating `dtype`, a `key` that is not one PRNG key, or a
    `matvec` whose output is not of shape `(n,)`.
    """
    where = "trace_estimate"
    if not callable(matvec):
        raise ValueError(f"{where}: matvec must be a function v -> A v, got {describe(matvec)}.")
    n = check_positive_int("n", n)
    num_matvecs = check_positive_int("num_matvecs", num_matvecs)
    method = check_method(where, method)
    dtype = check_float_dtype(where, jnp.result_type(float) if dtype is None else dtype)
    check_key("key", key)
    out = jax.eval_shape(matvec, jax.ShapeDtypeStruct((n,), dtype))
    if getattr(out, "shape", None) != (n,):
        raise ValueError(
            f"{where}: matvec must map a vector of shape ({n},) to shape ({n},), got "
            f"{getattr(out, 'shape', describe(out))}."
        )

    def mv(v):
        return jnp.asarray(matvec(v)).astype(dtype)

    sketch_key, probe_key = jax.random.split(key)
    if method == "hutchinson":
        if num_matvecs < 2:
            raise ValueError(
                f"{where}: method='hutchinson' needs num_matvecs >= 2 for a standard "
                f"error, got {num_matvecs}."
            )
        terms = hutchinson_terms(mv, rademacher(probe_key, (num_matvecs, n), dtype))
        value, stderr = mean_and_stderr(terms)
        return Estimate(value, stderr)
    k, m = hutchpp_split(where, num_matvecs, n)
    exact, terms = hutchpp_terms(
        mv, gaussian(sketch_key, (k, n), dtype), rademacher(probe_key, (m, n), dtype)
    )
    value, stderr = mean_and_stderr(terms)
    return Estimate(exact + value, stderr)
