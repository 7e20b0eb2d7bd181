"""`log |det J_F(x)|` of any map's Jacobian by stochastic Lanczos quadrature
(Ubaru, Chen & Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos
quadrature", SIAM J. Matrix Anal. Appl. 38(4), 2017), matrix-free: `J` only
through JVPs and VJPs (`jacobian_products`).

`log |det J| = (1/2) log det(J^T J) = (1/2) tr log(J^T J)`; with `B = J^T J`
(symmetric positive definite where `J` is invertible) and a unit probe `u`,
`u^T log(B) u` is the Riemann-Stieltjes integral of `log` against the spectral
measure of `B` seen from `u`, which `d` steps of Lanczos from `u` turn into the
`d`-point Gauss quadrature `sum_j tau_j^2 log theta_j` (`theta_j`, `tau_j`: the
eigenvalues and first eigenvector components of the Lanczos tridiagonal matrix
`T_d`; Ubaru et al. eq. 3.2 and Algorithm 1). Over Rademacher `u = g / sqrt(n)`,
`n u^T log(B) u` is Hutchinson's unbiased estimate of `tr log B`.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._linalg import eigh
from .._misc import check_key, check_positive_int
from ._operator import jacobian_products
from ._trace import Estimate, mean_and_stderr, rademacher


def lanczos_log_quadrature(matvec, u: Float[Array, " n"], depth: int) -> Float[Array, ""]:
    """`u^T log(B) u ~ sum_j tau_j^2 log theta_j` for a unit `u` and a symmetric
    positive definite `B` given by `matvec`, from `depth` Lanczos steps with full
    reorthogonalisation (two classical Gram-Schmidt passes against every earlier
    Lanczos vector, so that the quadrature does not see the ghost eigenvalues of
    plain Lanczos in finite precision).

    An invariant subspace found early (the residual below `100 eps` of the largest
    coefficient so far: `B u` in a Krylov space of dimension `j < depth`) makes
    the quadrature exact at `j` nodes; the remaining steps are padded with the
    node `theta = 1` (weight zero, `log 1 = 0`). Eigenvalues `theta` that round
    to `<= 0` (a singular `J`) are clamped to the dtype's smallest normal number.
    """
    n = u.shape[0]
    dtype = u.dtype
    eps = jnp.finfo(dtype).eps

    def step(carry, j):
        basis, v, v_prev, beta, scale, done = carry
        w = matvec(v) - beta * v_prev
        alpha = jnp.vdot(v, w)
        w = w - alpha * v
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        beta_next = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.maximum(jnp.abs(alpha), beta_next))
        # the coefficients of a step taken after the breakdown are padding
        alpha = jnp.where(done, jnp.ones((), dtype), alpha)
        breakdown = done | (beta_next <= 100 * eps * scale)
        beta_out = jnp.where(breakdown, jnp.zeros((), dtype), beta_next)
        v_next = jnp.where(breakdown, jnp.zeros_like(w), w / jnp.where(breakdown, 1, beta_next))
        basis = basis.at[j + 1].set(v_next)
        return (basis, v_next, v, beta_out, scale, breakdown), (alpha, beta_out)

    basis = jnp.zeros((depth + 1, n), dtype).at[0].set(u)
    zero = jnp.zeros((), dtype)
    init = (basis, u, jnp.zeros_like(u), zero, zero, jnp.zeros((), bool))
    _, (alphas, betas) = jax.lax.scan(step, init, jnp.arange(depth))
    tri = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    theta, vecs = eigh(tri)
    theta = jnp.maximum(theta, jnp.finfo(dtype).tiny)
    return jnp.sum(vecs[0] ** 2 * jnp.log(theta))


def log_det_slq(
    fn: Callable[[Float[Array, " n"]], Float[Array, " n"]],
    x: Float[ArrayLike, " n"],
    *,
    key: PRNGKeyArray,
    probes: int | np.integer = 16,
    depth: int | np.integer = 30,
) -> Estimate:
    """`log |det J_F(x)|` of a map `F: R^n -> R^n` at `x` by stochastic Lanczos
    quadrature on `J^T J` (Ubaru, Chen & Saad 2017), with its standard error: the
    matrix-free cross-check of `jf.log_det_estimate` and of the dense
    `jf.log_abs_det_jacobian`.

    Each of `m = probes` Rademacher probes `g_i` gives, from `depth` Lanczos steps
    on `B = J^T J` (`B v = J^T (J v)`: one JVP and one VJP a step) started at
    `u_i = g_i / sqrt(n)`, the Gauss quadrature `phi_i = n sum_j tau_ij^2 log
    theta_ij ~ g_i^T log(B) g_i` (Ubaru et al. Algorithm 1). Then
    `log |det J| = (1/2) tr log B ~ value = mean(phi_i) / 2` and
    `stderr = std(phi_i) / (2 sqrt(m))` (sample standard deviation, `ddof=1`).

    The standard error is that of the probes only. The quadrature's own error
    falls exponentially with `depth` at a rate set by the condition number of `B`
    (Ubaru et al. Theorem 4.1: `depth ~ sqrt(cond(B)) log(cond(B) / error)`
    suffices), and vanishes when `depth >= n` (the Krylov space is the whole
    space); `depth` is capped at `n`. `J^T J` squares `J`'s condition number:
    in float32, singular values of `J` below about `1e-3` of the largest lose
    accuracy.

    `fn` is a `jf.generation_map(field, ...)` (JVPs by forward mode, VJPs through
    its checkpointed reverse solve) or any differentiable map (linearised once,
    its VJP the transpose). Runs under `jit` (`probes`, `depth` static); the
    probes are batched with `jax.vmap`, holding `probes * (depth + 1) * n`
    numbers for the Lanczos vectors.

    **Arguments:**

    - `fn`: the map.
    - `x`: one point `(n,)`.
    - `key`: one PRNG key (the probes).
    - `probes`: `m >= 2`, the number of probes.
    - `depth`: the number of Lanczos steps per probe (>= 1).

    **Returns:** an `Estimate(value, stderr)` of `log |det J_F(x)|`
    (`jf.geometric_mean_from_log_det` turns it into `Ebar`).

    **Raises:** `ValueError` for `x` not one finite point `(n,)` (under `jit`, an
    error at run time for NaN), `fn(x)` not of `x`'s shape, `fn` not callable, a
    `key` that is not one PRNG key, `probes` not an int >= 2, or `depth` not a
    positive int.
    """
    where = "log_det_slq"
    check_key("key", key)
    m = check_positive_int("probes", probes)
    if m < 2:
        raise ValueError(f"{where}: probes must be >= 2 for a standard error, got {probes!r}.")
    depth = check_positive_int("depth", depth)
    _, jvp, vjp = jacobian_products(fn, x, where)
    x = jnp.asarray(x)
    n = x.shape[0]
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.result_type(float)
    depth = min(depth, n)

    def gram(v):
        return vjp(jvp(v)).astype(dtype)

    g = rademacher(key, (m, n), dtype)
    u = g / jnp.sqrt(jnp.asarray(n, dtype))
    phi = n * jax.vmap(lambda ui: lanczos_log_quadrature(gram, ui, depth))(u)
    mean, stderr = mean_and_stderr(phi)
    return Estimate(mean / 2, stderr / 2)
