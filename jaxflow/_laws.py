"""Closed-form data laws and their posterior means under a Gaussian path (docs/mathematics.md §3).

Every law answers, for `X_t = alpha X + sigma Z`:

- `posterior(x, alpha, sigma) -> (D, s)`: the denoiser `D = E[X | X_t = x]` and the
  score `s = grad log p_t(x)`; the noise prediction is `Zhat = -sigma s`.
- `marginal_log_prob(x, alpha, sigma)`: `log p_t(x)`.

All densities stay in log space: they underflow for `n` in the hundreds.

A law's arrays share one floating dtype, the result type of its inputs (integers
become the default float). Its parameters are checked in that dtype, once, at
construction: a `ValueError` for concrete values, `eqx.error_if` on the stored arrays
for values traced under `jit` or `vmap`, with the same message.
"""

import abc
import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Real

from ._misc import (
    array_namespace,
    as_array,
    as_float_array,
    check,
    check_nonempty,
    check_positive,
    check_spd,
    check_weights,
    float_dtype,
    given_eps,
)

_LOG_2PI = math.log(2 * math.pi)


class AbstractLaw(eqx.Module):
    """A data law on `R^n` with closed-form posterior means under Gaussian paths."""

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """The dimension `n`."""

    @abc.abstractmethod
    def log_prob(self, x: Float[Array, " n"]) -> Float[Array, ""]:
        """`log p(x)` of the data law (the marginal at `t = 0`)."""

    @abc.abstractmethod
    def sample(self, key: PRNGKeyArray, shape: tuple[int, ...] = ()) -> Float[Array, "..."]:
        """Draw samples of shape `shape + (n,)`."""

    @abc.abstractmethod
    def posterior(
        self, x: Float[Array, " n"], alpha: Real[ArrayLike, ""], sigma: Real[ArrayLike, ""]
    ) -> tuple[Float[Array, " n"], Float[Array, " n"]]:
        """`(E[X | alpha X + sigma Z = x], grad_x log p_t(x))`."""

    @abc.abstractmethod
    def marginal_log_prob(
        self, x: Float[Array, " n"], alpha: Real[ArrayLike, ""], sigma: Real[ArrayLike, ""]
    ) -> Float[Array, ""]:
        """`log p_t(x)` of `alpha X + sigma Z`."""

    closed_form_divergence: eqx.AbstractClassVar[bool]
    """Whether `velocity_divergence` has a closed form for this law."""

    has_density: eqx.AbstractClassVar[bool]
    """Whether the law has a density. One without (a Dirac mixture) has a score
    `(alpha D - x) / sigma^2` that is infinite where `sigma = 0`: the PF-ODE
    velocity is singular at the data end."""

    @abc.abstractmethod
    def velocity_divergence(
        self,
        x: Float[Array, " n"],
        alpha: Real[ArrayLike, ""],
        sigma: Real[ArrayLike, ""],
        d_alpha: Real[ArrayLike, ""],
        sigma_d_sigma: Real[ArrayLike, ""],
    ) -> Float[Array, ""]:
        """`div_x v` of the PF-ODE velocity `v = alpha' D - sigma sigma' s` in closed
        form; raises `NotImplementedError` where `closed_form_divergence` is False."""


def _point(law: AbstractLaw, x):
    """One point `(n,)` of the law's dimension, as an array (a static check: shapes
    are known under `jit`)."""
    x = jnp.asarray(x)
    if x.shape != (law.dim,):
        raise ValueError(
            f"{type(law).__name__} takes one point of shape ({law.dim},), got shape "
            f"{x.shape}; batch with jax.vmap."
        )
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float))


def _covariance_spectrum(covariances, k, n, name, eps):
    """Eigen-decompose covariances once, `S_k = V_k diag(lam_k) V_k^T`, and check the
    spectrum the law will use (`check_spd`, `check_positive`).

    Accepts isotropic `(K,)`, diagonal `(K, n)` or full `(K, n, n)`. Returns
    `(V or None, lam)`; `V is None` means the standard basis.
    """
    if covariances.ndim == 1:
        if covariances.shape != (k,):
            raise ValueError(
                f"{name}: isotropic variances need shape ({k},), got {covariances.shape}."
            )
        covariances = check_positive(f"{name} (isotropic variances)", covariances)
        return None, jnp.broadcast_to(covariances[:, None], (k, n))
    if covariances.ndim == 2:
        if covariances.shape != (k, n):
            raise ValueError(
                f"{name}: diagonal variances need shape ({k}, {n}), got {covariances.shape}."
            )
        return None, check_positive(f"{name} (diagonal variances)", covariances)
    if covariances.shape != (k, n, n):
        raise ValueError(
            f"{name}: full covariances need shape ({k}, {n}, {n}), got {covariances.shape}."
        )
    return check_spd(name, covariances, eps)


def _mixture_terms(log_weights, means, eigvecs, eigvals, x, alpha, sigma):
    """Per-component log densities and whitened residuals `C_k^{-1}(x - alpha mu_k)`.

    Works in each component's eigenbasis, so no factorisation happens per call
    (docs/mathematics.md §3): `C_k = V (alpha^2 lam + sigma^2) V^T`.
    """
    resid = x[None, :] - alpha * means  # (K, n)
    y = resid if eigvecs is None else jnp.einsum("kji,kj->ki", eigvecs, resid)
    c = alpha**2 * eigvals + sigma**2
    yc = y / c
    n = x.shape[-1]
    log_n = -0.5 * (n * _LOG_2PI + jnp.sum(jnp.log(c), -1) + jnp.sum(y * yc, -1))
    return log_weights + log_n, y, yc, c


def _responsibilities(logits, *per_component):
    """`softmax(logits)`, and the per-component arrays with the rows of components of
    zero responsibility set to 0: those may lie so far from `x` that their terms
    overflowed, and `0 * inf` would make the sums NaN. A single component has
    responsibility 1 even where its density underflows (softmax would give NaN)."""
    r = jnp.ones_like(logits) if logits.shape[0] == 1 else jax.nn.softmax(logits)
    keep = (r > 0)[:, None]
    return (r,) + tuple(jnp.where(keep, v, 0.0) for v in per_component)


def _to_standard_basis(eigvecs, v):
    return v if eigvecs is None else jnp.einsum("kij,kj->ki", eigvecs, v)


def _component_terms(log_weights, means, eigvecs, eigvals, x, alpha, sigma):
    """A mixture's responsibilities `r_k`, per-component scores `s_k` and denoisers
    `D_k` (zeroed where the responsibility is 0), and what their derivatives in `x`
    need: the whitened residuals `yc` (zeroed alike; in each component's
    eigenbasis), the gains `alpha lam / c` and `c = alpha^2 lam + sigma^2`."""
    logits, y, yc, c = _mixture_terms(log_weights, means, eigvecs, eigvals, x, alpha, sigma)
    score_k = -_to_standard_basis(eigvecs, yc)  # (K, n)
    # D_k = mu_k + alpha S_k C_k^{-1}(x - alpha mu_k), with the gain
    # alpha lam / c <= 1 / alpha formed first: lam * yc overflows where c is tiny.
    gain = alpha * eigvals / c
    d_k = means + _to_standard_basis(eigvecs, gain * y)
    r, score_k, d_k, yc = _responsibilities(logits, score_k, d_k, yc)
    return r, score_k, d_k, yc, gain, c


def _diagonal_posterior_direct(log_weights, means, eigvals, x, alpha, sigma):
    r, score_k, d_k, *_ = _component_terms(log_weights, means, None, eigvals, x, alpha, sigma)
    return r @ d_k, r @ score_k


@jax.custom_jvp
def _diagonal_posterior(log_weights, means, eigvals, x, alpha, sigma):
    """`(D, s)` of a mixture with diagonal (or isotropic) covariances.

    Its derivative in `x` is written out so that many tangents at once are matrix
    products with the `(K, n)` arrays, which do not depend on the tangents:
    `d logit_k = -yc_k . u`, `dr = r (dl - r . dl)`,
    `dD = dr D_k + (r gain) u`, `ds = dr s_k - (r / c) u` (`D_k`, `s_k` affine in
    `x` with diagonal slopes). Autodiff of the direct formula instead forms
    `(tangents, K, n)` arrays elementwise, 40x slower for 20 tangents at K = 300,
    n = 4096. Derivatives in the other arguments are autodiff's."""
    return _diagonal_posterior_direct(log_weights, means, eigvals, x, alpha, sigma)


def _diagonal_posterior_jvp(primals, tangents):
    *params, x, alpha, sigma = primals
    *d_params, dx, d_alpha, d_sigma = tangents
    log_weights, means, eigvals = params
    r, score_k, d_k, yc, gain, c = _component_terms(
        log_weights, means, None, eigvals, x, alpha, sigma
    )
    out = (r @ d_k, r @ score_k)
    tangent = tuple(jnp.zeros_like(o) for o in out)
    zero = jax.custom_derivatives.SymbolicZero
    others = list(zip((*params, alpha, sigma), (*d_params, d_alpha, d_sigma), strict=True))
    if not all(isinstance(d, zero) for _, d in others):
        # the law's parameters and the path's coefficients: autodiff of the direct
        # formula, `x` held fixed
        def direct(lw, mu, lam, a, sg):
            return _diagonal_posterior_direct(lw, mu, lam, x, a, sg)

        _, tangent = jax.jvp(
            direct,
            tuple(a for a, _ in others),
            tuple(jnp.zeros_like(a) if isinstance(d, zero) else d for a, d in others),
        )
    if not isinstance(dx, zero):
        dl = -(yc @ dx)
        dr = r * (dl - r @ dl)
        tangent = (
            tangent[0] + dr @ d_k + (r @ gain) * dx,
            tangent[1] + dr @ score_k - (r @ (1 / c)) * dx,
        )
    return out, tangent


_diagonal_posterior.defjvp(_diagonal_posterior_jvp, symbolic_zeros=True)


class GaussianMixture(AbstractLaw):
    """Mixture of Gaussians `sum_k a_k N(mu_k, S_k)` (docs/mathematics.md §3).

    **Arguments:**

    - `weights`: `(K,)`, positive, summing to one.
    - `means`: `(K, n)`.
    - `covariances`: full `(K, n, n)` symmetric positive definite, diagonal `(K, n)`
      or isotropic `(K,)` variances.

    All are stored in one floating dtype, the result type of the three; a full
    covariance must not be numerically singular in it (smallest eigenvalue above
    `n eps` times the largest), variances must be normal numbers.
    """

    weights: Float[Array, " K"]
    means: Float[Array, "K n"]
    eigvecs: Float[Array, "K n n"] | None
    eigvals: Float[Array, "K n"]

    closed_form_divergence: ClassVar[bool] = True
    has_density: ClassVar[bool] = True

    def __init__(self, weights, means, covariances):
        weights = as_array("GaussianMixture weights", weights, "(K,)")
        means = as_array("GaussianMixture means", means, "(K, n)")
        covariances = as_array(
            "GaussianMixture covariances",
            covariances,
            "(K, n, n) (full), (K, n) (diagonal) or (K,) (isotropic)",
        )
        dtype = float_dtype(weights, means, covariances)
        w_eps, cov_eps = given_eps(weights), given_eps(covariances)
        means = as_float_array("GaussianMixture means", means, ndim=2, dtype=dtype)
        k, n = means.shape
        check_nonempty("GaussianMixture", k, n)
        weights = as_float_array("GaussianMixture weights", weights, ndim=1, dtype=dtype)
        if weights.shape != (k,):
            raise ValueError(
                f"GaussianMixture: weights have shape {weights.shape} but means have "
                f"{k} rows; pass one weight per component."
            )
        covariances = as_float_array(
            "GaussianMixture covariances", covariances, ndim=(1, 2, 3), dtype=dtype
        )
        self.weights = check_weights("GaussianMixture weights", weights, w_eps)
        self.means = means
        self.eigvecs, self.eigvals = _covariance_spectrum(
            covariances, k, n, "GaussianMixture covariances", cov_eps
        )

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    @property
    def covariances(self) -> Float[Array, "K n n"]:
        """The full covariance matrices, rebuilt from the stored spectrum."""
        if self.eigvecs is None:
            return jax.vmap(jnp.diag)(self.eigvals)
        return jnp.einsum("kij,kj,klj->kil", self.eigvecs, self.eigvals, self.eigvecs)

    def _components(self, x, alpha, sigma):
        """Responsibilities `r_k` and per-component scores `s_k` and denoisers `D_k`."""
        return _component_terms(
            jnp.log(self.weights), self.means, self.eigvecs, self.eigvals, x, alpha, sigma
        )[:3]

    def posterior(self, x, alpha, sigma):
        x = _point(self, x)
        if self.eigvecs is None:
            return _diagonal_posterior(
                jnp.log(self.weights), self.means, self.eigvals, x, alpha, sigma
            )
        r, score_k, d_k = self._components(x, alpha, sigma)
        return r @ d_k, r @ score_k

    def marginal_log_prob(self, x, alpha, sigma):
        x = _point(self, x)
        logits = _mixture_terms(
            jnp.log(self.weights), self.means, self.eigvecs, self.eigvals, x, alpha, sigma
        )[0]
        return jax.nn.logsumexp(logits)

    def velocity_divergence(self, x, alpha, sigma, d_alpha, sigma_d_sigma):
        """Closed-form `div_x v` of the PF-ODE velocity `v = alpha' D - sigma sigma' s`
        (docs/mathematics.md §7), at about the cost of one evaluation of `v`.

        Each component's velocity is affine, `v_k = A_k (x - alpha mu_k) + alpha' mu_k`
        with `A_k = (alpha alpha' S_k + sigma sigma' I) C_k^{-1}`; the responsibilities
        move with `grad r_k = r_k (s_k - s)`, so
        `div v = sum_k r_k tr A_k + sum_k r_k (s_k - s) . v_k`.
        """
        x = _point(self, x)
        r, score_k, d_k = self._components(x, alpha, sigma)
        c = alpha**2 * self.eigvals + sigma**2
        trace = jnp.sum((alpha * d_alpha * self.eigvals + sigma_d_sigma) / c, -1)
        v_k = d_alpha * d_k - sigma_d_sigma * score_k
        score = r @ score_k
        return r @ trace + jnp.sum(r * jnp.sum((score_k - score) * v_k, -1))

    def log_prob(self, x):
        x = _point(self, x)
        return self.marginal_log_prob(x, 1.0, 0.0)

    def sample(self, key, shape=()):
        kc, kz = jax.random.split(key)
        comp = jax.random.categorical(kc, jnp.log(self.weights), shape=shape)
        z = jax.random.normal(kz, shape + (self.dim,), dtype=self.means.dtype)
        scaled = jnp.sqrt(self.eigvals[comp]) * z
        if self.eigvecs is not None:
            scaled = jnp.einsum("...ij,...j->...i", self.eigvecs[comp], scaled)
        return self.means[comp] + scaled


class Gaussian(AbstractLaw):
    """A Gaussian law `N(mean, covariance)`.

    Under the rectified-flow path its generation map is exactly
    `G(z) = mean + covariance^(1/2) z` (docs/mathematics.md §3), the cleanest end-to-end check.

    **Arguments:**

    - `mean`: `(n,)`.
    - `covariance`: full `(n, n)` SPD, diagonal `(n,)`, or a positive scalar.

    Both are stored in one floating dtype, their result type, and checked as
    `GaussianMixture`'s.
    """

    mixture: GaussianMixture

    closed_form_divergence: ClassVar[bool] = True
    has_density: ClassVar[bool] = True

    def __init__(self, mean, covariance):
        mean = as_array("Gaussian mean", mean, "(n,)")
        covariance = as_array(
            "Gaussian covariance", covariance, "(n, n) (full), (n,) (diagonal) or () (a scalar)"
        )
        dtype = float_dtype(mean, covariance)
        mean = as_float_array("Gaussian mean", mean, ndim=1, dtype=dtype)
        covariance = as_float_array("Gaussian covariance", covariance, ndim=(0, 1, 2), dtype=dtype)
        n = mean.shape[0]
        check_nonempty("Gaussian", 1, n)
        if covariance.ndim == 1 and covariance.shape != (n,):
            raise ValueError(
                f"Gaussian: diagonal covariance needs shape ({n},), got {covariance.shape}."
            )
        if covariance.ndim == 2 and covariance.shape != (n, n):
            raise ValueError(
                f"Gaussian: covariance needs shape ({n}, {n}), got {covariance.shape}."
            )
        self.mixture = GaussianMixture(jnp.ones(1, mean.dtype), mean[None], covariance[None])

    @property
    def dim(self) -> int:
        return self.mixture.dim

    @property
    def mean(self) -> Float[Array, " n"]:
        return self.mixture.means[0]

    @property
    def covariance(self) -> Float[Array, "n n"]:
        return self.mixture.covariances[0]

    def sqrt_covariance(self) -> Float[Array, "n n"]:
        """The symmetric square root `S^(1/2)`: the Jacobian of the RF generation map."""
        lam = self.mixture.eigvals[0]
        if self.mixture.eigvecs is None:
            return jnp.diag(jnp.sqrt(lam))
        v = self.mixture.eigvecs[0]
        return (v * jnp.sqrt(lam)) @ v.T

    def posterior(self, x, alpha, sigma):
        return self.mixture.posterior(x, alpha, sigma)

    def marginal_log_prob(self, x, alpha, sigma):
        return self.mixture.marginal_log_prob(x, alpha, sigma)

    def velocity_divergence(self, x, alpha, sigma, d_alpha, sigma_d_sigma):
        """Closed-form `div_x v`; see `GaussianMixture.velocity_divergence`."""
        return self.mixture.velocity_divergence(x, alpha, sigma, d_alpha, sigma_d_sigma)

    def log_prob(self, x):
        return self.mixture.log_prob(x)

    def sample(self, key, shape=()):
        return self.mixture.sample(key, shape)


class Empirical(AbstractLaw):
    """Empirical (Dirac mixture) law `sum_i w_i delta_{x_i}` (paper 002 eq. 4.36-4.39).

    The posterior is a softmax over the points:
    `r = softmax(log w_i - |x - alpha x_i|^2 / (2 sigma^2))`, `D = sum_i r_i x_i`.
    A measure on a curve is an `Empirical` law on quadrature nodes (docs/mathematics.md §3).

    **Arguments:**

    - `points`: `(N, n)`.
    - `weights`: `(N,)` positive, summing to one; uniform when `None`.

    Both are stored in one floating dtype, the result type of the two. The law has no
    density and no score at `sigma = 0` (the data end): ask at `sigma > 0`.
    """

    points: Float[Array, "N n"]
    weights: Float[Array, " N"]

    closed_form_divergence: ClassVar[bool] = False
    has_density: ClassVar[bool] = False

    def __init__(self, points, weights=None):
        points = as_array("Empirical points", points, "(N, n)")
        weights = as_array("Empirical weights", weights, "(N,)")
        dtype = float_dtype(points, weights)
        w_eps = given_eps(weights)
        points = as_float_array("Empirical points", points, ndim=2, dtype=dtype)
        check_nonempty("Empirical", *points.shape, item="point")
        if weights is None:
            weights = jnp.full(points.shape[0], 1.0 / points.shape[0], dtype)
        weights = as_float_array("Empirical weights", weights, ndim=1, dtype=dtype)
        if weights.shape != points.shape[:1]:
            raise ValueError(
                f"Empirical: weights have shape {weights.shape} but there are "
                f"{points.shape[0]} points; pass one weight per point."
            )
        self.points = points
        self.weights = check_weights("Empirical weights", weights, w_eps)

    @property
    def dim(self) -> int:
        return self.points.shape[-1]

    def _logits(self, x, alpha, sigma):
        """The logits less their common part `-min_i d_i^2 / (2 sigma^2)`, and that
        part: measured from the nearest point, the nearest logit stays finite where
        `d^2 / sigma^2` overflows (small `sigma`, float32) and softmax would give NaN."""
        d2 = jnp.sum((x[None, :] - alpha * self.points) ** 2, -1)
        d2_min = jnp.min(d2)
        return jnp.log(self.weights) - 0.5 * (d2 - d2_min) / sigma**2, -0.5 * d2_min / sigma**2

    def posterior(self, x, alpha, sigma):
        x = _point(self, x)
        r, d_k = _responsibilities(self._logits(x, alpha, sigma)[0], self.points)
        d = r @ d_k
        return d, (alpha * d - x) / sigma**2

    def marginal_log_prob(self, x, alpha, sigma):
        x = _point(self, x)
        # a Dirac mixture has no density: log p_t is -inf or +inf at sigma = 0
        x = check(x, ~(jnp.asarray(sigma) > 0), "Empirical.marginal_log_prob needs sigma > 0.")
        n = self.dim
        logits, common = self._logits(x, alpha, sigma)
        return jax.nn.logsumexp(logits) + common - 0.5 * n * (_LOG_2PI + 2 * jnp.log(sigma))

    def velocity_divergence(self, x, alpha, sigma, d_alpha, sigma_d_sigma):
        x = _point(self, x)
        raise NotImplementedError(
            f"{type(self).__name__} has no closed-form divergence; use the field's "
            "divergence with method='trace' or 'hutchinson'."
        )

    def log_prob(self, x):
        x = _point(self, x)
        raise ValueError(
            "Empirical is a Dirac mixture and has no density; use "
            "marginal_log_prob(x, alpha, sigma) with sigma > 0."
        )

    def sample(self, key, shape=()):
        idx = jax.random.categorical(key, jnp.log(self.weights), shape=shape)
        return self.points[idx]


def _log1mexp(x):
    """`log(1 - exp(x))` for `x < 0`, accurate on both sides of `-log 2`."""
    return jnp.where(x > -math.log(2), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _box_posterior(x, lower, upper, alpha, tau, small):
    """One box component of a Gaussian-neighbours law, coordinate-wise.

    With `U ~ Uniform[l, u]` and `X_t = alpha U + tau xi`, returns
    `log p(x_d)` per coordinate and `kappa = E[xi | X_t = x]`, the mean of a standard
    normal truncated to `[(x - alpha u)/tau, (x - alpha l)/tau]`; then
    `alpha E[U | x] = x - tau kappa`.
    """
    lo = (x - alpha * upper) / tau
    hi = (x - alpha * lower) / tau
    width = hi - lo  # = alpha (u - l) / tau >= 0
    mid = 0.5 * (lo + hi)
    is_small = width < small
    # Narrow interval (including alpha -> 0): expand around the midpoint; the
    # difference of CDFs below would cancel to nothing there.
    log_pdf_mid = -0.5 * (mid**2 + _LOG_2PI)
    # (width mid)^2, not width^2 mid^2: far from a box with tiny widths mid^2
    # overflows while width is 0, and 0 * inf is NaN.
    log_small = log_pdf_mid + ((width * mid) ** 2 - width**2) / 24.0 - jnp.log(tau)
    kappa_small = mid - width * (width * mid) / 12.0
    # Wide interval: reflect into the left tail so log_ndtr keeps its digits.
    hi_s = jnp.where(is_small, mid + 1.0, hi)
    lo_s = jnp.where(is_small, mid - 1.0, lo)
    flip = lo_s > 0
    a = jnp.where(flip, -hi_s, lo_s)
    b = jnp.where(flip, -lo_s, hi_s)
    log_phi_b = jax.scipy.special.log_ndtr(b)
    # Far from the box (b^2 overflows, tiny widths) log Phi(b) = -inf and so is log Z;
    # -inf - -inf would be NaN and poison the softmax over the components.
    log_ratio = jax.scipy.special.log_ndtr(a) - log_phi_b
    log_z = log_phi_b + _log1mexp(jnp.where(jnp.isneginf(log_phi_b), -jnp.inf, log_ratio))
    log_big = log_z - jnp.log(alpha * (upper - lower) + jnp.where(is_small, 1.0, 0.0))
    pdf_lo = jnp.exp(-0.5 * (lo_s**2 + _LOG_2PI) - log_z)
    pdf_hi = jnp.exp(-0.5 * (hi_s**2 + _LOG_2PI) - log_z)
    kappa_big = pdf_lo - pdf_hi
    return (
        jnp.where(is_small, log_small, log_big),
        jnp.where(is_small, kappa_small, kappa_big),
    )


class GaussianNeighbours(AbstractLaw):
    """Mixture of Gaussian neighbours `p = sum_i a_i f_i * g_{w_i}` (paper 000 Assumption 4.3).

    Each `f_i` is uniform on the axis-aligned box `prod_d [lower_id, upper_id]` and
    `g_w = N(0, w^2 I)`. Under a Gaussian path the component is `alpha U + tau xi`,
    `tau^2 = alpha^2 w_i^2 + sigma^2`: every coordinate is a uniform convolved with a
    Gaussian, so densities and posterior means are closed-form (docs/mathematics.md §3).

    **Arguments:**

    - `weights`: `(m,)` positive, summing to one.
    - `lower`, `upper`: `(m, n)` box corners with `lower < upper`.
    - `widths`: `(m,)` Gaussian widths `w_i > 0`.

    All are stored in one floating dtype, the result type of the four, and checked in
    it: `lower < upper` after rounding, `w_i^2` a normal, finite number.
    """

    weights: Float[Array, " m"]
    lower: Float[Array, "m n"]
    upper: Float[Array, "m n"]
    widths: Float[Array, " m"]

    closed_form_divergence: ClassVar[bool] = False
    has_density: ClassVar[bool] = True

    def __init__(self, weights, lower, upper, widths):
        weights = as_array("GaussianNeighbours weights", weights, "(m,)")
        lower = as_array("GaussianNeighbours lower", lower, "(m, n)")
        upper = as_array("GaussianNeighbours upper", upper, "(m, n)")
        widths = as_array("GaussianNeighbours widths", widths, "(m,)")
        dtype = float_dtype(weights, lower, upper, widths)
        w_eps = given_eps(weights)
        lower = as_float_array("GaussianNeighbours lower", lower, ndim=2, dtype=dtype)
        upper = as_float_array("GaussianNeighbours upper", upper, ndim=2, dtype=dtype)
        weights = as_float_array("GaussianNeighbours weights", weights, ndim=1, dtype=dtype)
        widths = as_float_array("GaussianNeighbours widths", widths, ndim=1, dtype=dtype)
        m = lower.shape[0]
        check_nonempty("GaussianNeighbours", m, lower.shape[1], item="box")
        if upper.shape != lower.shape:
            raise ValueError(
                f"GaussianNeighbours: lower {lower.shape} and upper {upper.shape} "
                "must have the same shape (m, n)."
            )
        if weights.shape != (m,) or widths.shape != (m,):
            raise ValueError(
                f"GaussianNeighbours: weights {weights.shape} and widths {widths.shape} "
                f"need shape ({m},), one per box."
            )
        weights = check_weights("GaussianNeighbours weights", weights, w_eps)
        # tau^2 = alpha^2 w^2 + sigma^2 is the whole variance at t = 0
        widths = check_positive("GaussianNeighbours widths", widths, squared=True)
        xp = array_namespace(lower, upper)
        lo, hi = xp.asarray(lower), xp.asarray(upper)
        upper = check(
            upper,
            ~(lo < hi),
            f"GaussianNeighbours: every box needs lower < upper in each coordinate (in "
            f"{dtype}); swap or widen the offending sides.",
        )
        upper = check(
            upper,
            ~xp.isfinite(hi - lo),
            f"GaussianNeighbours: a box's side upper - lower overflows {dtype}; rescale the boxes.",
        )
        self.weights, self.lower, self.upper, self.widths = weights, lower, upper, widths

    @property
    def dim(self) -> int:
        return self.lower.shape[-1]

    def _terms(self, x, alpha, sigma):
        tau = jnp.sqrt(alpha**2 * self.widths**2 + sigma**2)  # (m,)
        small = 1e-3 if x.dtype == jnp.float64 else 3e-2
        log_d, kappa = jax.vmap(_box_posterior, in_axes=(None, 0, 0, None, 0, None))(
            x, self.lower, self.upper, alpha, tau, small
        )
        return jnp.log(self.weights) + jnp.sum(log_d, -1), kappa, tau

    def posterior(self, x, alpha, sigma):
        x = _point(self, x)
        logits, kappa, tau = self._terms(x, alpha, sigma)
        score = -kappa / tau[:, None]
        # E[U | x, i] = (x - tau kappa) / alpha; written without dividing by a small alpha.
        lo = (x - alpha * self.upper) / tau[:, None]
        hi = (x - alpha * self.lower) / tau[:, None]
        mid = 0.5 * (lo + hi)
        centre = 0.5 * (self.lower + self.upper)
        # kappa - mid is O(width^2), so E[U] = centre - tau (kappa - mid) / alpha.
        safe_alpha = jnp.where(alpha > 0, alpha, 1.0)
        mean_u = jnp.where(
            alpha > 0,
            centre - tau[:, None] * (kappa - mid) / safe_alpha,
            centre,
        )
        d = mean_u + (alpha * self.widths**2 / tau)[:, None] * kappa
        r, d, score = _responsibilities(logits, d, score)
        return r @ d, r @ score

    def marginal_log_prob(self, x, alpha, sigma):
        x = _point(self, x)
        logits, _, _ = self._terms(x, alpha, sigma)
        return jax.nn.logsumexp(logits)

    def velocity_divergence(self, x, alpha, sigma, d_alpha, sigma_d_sigma):
        x = _point(self, x)
        raise NotImplementedError(
            f"{type(self).__name__} has no closed-form divergence; use the field's "
            "divergence with method='trace' or 'hutchinson'."
        )

    def log_prob(self, x):
        x = _point(self, x)
        return self.marginal_log_prob(x, 1.0, 0.0)

    def sample(self, key, shape=()):
        kc, ku, kz = jax.random.split(key, 3)
        comp = jax.random.categorical(kc, jnp.log(self.weights), shape=shape)
        u = jax.random.uniform(ku, shape + (self.dim,), dtype=self.lower.dtype)
        box = self.lower[comp] + u * (self.upper[comp] - self.lower[comp])
        z = jax.random.normal(kz, shape + (self.dim,), dtype=self.lower.dtype)
        return box + self.widths[comp][..., None] * z

    def own_box_mass(self) -> Float[Array, " m"]:
        """`alpha_i = int_{B_i} f_i * g_{w_i}`: the mass each component keeps inside its
        own box (paper 000 Assumption 4.4.4 asks for it to stay bounded below as n grows).

        Per coordinate, a uniform on `[0, b]` blurred by `N(0, w^2)` stays in `[0, b]`
        with probability `q(beta) = erf(beta / sqrt 2) + (2 / beta)(phi(beta) -
        phi(0))`, `beta = b / w`; the coordinates are independent, so `alpha_i` is the
        product of the `q`, formed in log space.
        """
        beta = (self.upper - self.lower) / self.widths[:, None]
        phi = jax.scipy.stats.norm.pdf
        q = jax.scipy.special.erf(beta / math.sqrt(2)) + 2 / beta * (phi(beta) - phi(0.0))
        return jnp.exp(jnp.sum(jnp.log(q), -1))

    def min_box_distance(self) -> Float[Array, ""]:
        """`d_min`: the smallest Euclidean distance between two boxes (Assumption 4.4)."""
        gap = jnp.maximum(
            0.0,
            jnp.maximum(
                self.lower[:, None, :] - self.upper[None, :, :],
                self.lower[None, :, :] - self.upper[:, None, :],
            ),
        )
        dist = jnp.sqrt(jnp.sum(gap**2, -1))
        m = self.weights.shape[0]
        return jnp.min(jnp.where(jnp.eye(m, dtype=bool), jnp.inf, dist))

    def theorem_4_3_m0(self) -> Float[Array, ""]:
        """`M_0 = min_i exp(dbar^2 / (8 w_i) - ln(1/w_i) + 2 + 3 sqrt(2/n))` of
        paper 000 Theorem 4.3 (as printed), `dbar = d_min / sqrt(n)`."""
        return jnp.exp(self.theorem_4_3_log_m0())

    def theorem_4_3_log_m0(self) -> Float[Array, ""]:
        """`log M_0` (see `theorem_4_3_m0`), which stays finite where `M_0`
        overflows (from n of a few thousand in float64)."""
        n = self.dim
        dbar = self.min_box_distance() / math.sqrt(n)
        w = self.widths
        return jnp.min(dbar**2 / (8 * w) + jnp.log(w) + 2 + 3 * math.sqrt(2 / n))
