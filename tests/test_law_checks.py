"""Law and path parameters are checked once, at construction, in the dtype they are
stored in, eagerly (`ValueError`) and under `jit`, `eqx.filter_jit` and `vmap`
(`eqx.error_if`, with the same message); a law that constructs gives no NaN."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxflow as jf

# eqx.error_if raises EquinoxRuntimeError, or under jax.jit an XLA runtime error
# that carries the message
RUNTIME = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError)

W = np.array([0.5, 0.5])
MU = np.array([[0.0, 0.0], [1.0, 1.0]])
COV = np.stack([np.eye(2)] * 2)
LO, HI = np.zeros((2, 2)), np.ones((2, 2))
WIDTHS = np.array([0.1, 0.2])
F32 = np.float32


def _rotated(eigenvalues, dtype):
    """`Q diag(eigenvalues) Q^T` for a fixed rotation, formed in float64, then rounded."""
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((2, 2)))
    return ((q * np.asarray(eigenvalues)) @ q.T).astype(dtype)


# (id, construction from one array argument, good argument, bad argument, what the
# message says); the good and bad arguments share a shape so vmap can batch them.
CASES = [
    ("weights_sum", lambda w: jf.GaussianMixture(w, MU, COV), W, [0.3, 0.3], "sum to one"),
    ("weights_negative", lambda w: jf.GaussianMixture(w, MU, COV), W, [1.5, -0.5], "> 0"),
    (
        "weights_denormal_f32",
        lambda w: jf.GaussianMixture(w, MU.astype(F32), COV.astype(F32)),
        W.astype(F32),
        np.array([1.0, 1e-45], F32),
        "> 0",
    ),
    ("means_nan", lambda m: jf.GaussianMixture(W, m, COV), MU, [[0, np.nan], [0, 0]], "NaN"),
    ("variances_negative", lambda c: jf.GaussianMixture(W, MU, c), [1.0, 2.0], [1.0, -1.0], "> 0"),
    (
        "variances_denormal_f32",
        lambda c: jf.GaussianMixture(W.astype(F32), MU.astype(F32), c),
        np.ones((2, 2), F32),
        np.array([[1.0, 1.0], [1.0, 1e-45]], F32),
        "> 0",
    ),
    (
        "covariance_asymmetric",
        lambda c: jf.GaussianMixture(W, MU, c),
        COV,
        np.stack([[[1.0, 0.5], [0.0, 1.0]]] * 2),
        "symmetric",
    ),
    (
        "covariance_indefinite",
        lambda c: jf.GaussianMixture(W, MU, c),
        COV,
        np.stack([[[1.0, 2.0], [2.0, 1.0]]] * 2),
        "positive definite",
    ),
    (
        "covariance_singular_f32",
        lambda c: jf.Gaussian(np.zeros(2, F32), c),
        _rotated([1.0, 1e-3], F32),
        _rotated([1.0, 1e-8], F32),
        "numerically singular in float32",
    ),
    (
        "covariance_singular_f64",
        lambda c: jf.Gaussian(np.zeros(2), c),
        _rotated([1.0, 1e-12], np.float64),
        _rotated([1.0, 1e-17], np.float64),
        "numerically singular in float64",
    ),
    ("gaussian_scalar_zero", lambda c: jf.Gaussian(np.zeros(2), c), 1.0, 0.0, "> 0"),
    ("gaussian_mean_nan", lambda m: jf.Gaussian(m, np.eye(2)), [0.0, 0.0], [np.nan, 0.0], "NaN"),
    ("empirical_points_inf", lambda p: jf.Empirical(p), MU, [[0, 0], [-np.inf, 0]], "NaN"),
    ("empirical_weights", lambda w: jf.Empirical(MU, w), W, [0.5, 0.6], "sum to one"),
    (
        "neighbours_lower_above_upper",
        lambda lo: jf.GaussianNeighbours(W, lo, HI, WIDTHS),
        LO,
        [[0.0, 0.0], [0.0, 2.0]],
        "lower < upper",
    ),
    (
        "neighbours_widths_zero",
        lambda w: jf.GaussianNeighbours(W, LO, HI, w),
        WIDTHS,
        [0.1, 0.0],
        "widths must be > 0",
    ),
    (
        "neighbours_widths_square_underflows",
        lambda w: jf.GaussianNeighbours(W, LO, HI, w),
        WIDTHS,
        [0.1, 1e-160],
        "widths must be > 0",
    ),
]

# filter_jit differs from jit only in how the error travels: a few cases suffice
FILTER_JIT = {"weights_sum", "covariance_singular_f32", "neighbours_lower_above_upper"}
# the vmapped eigh of these compiles for seconds, and another case takes its path
NOT_VMAPPED = {"covariance_singular_f64", "covariance_asymmetric"}

MODES = {
    "jit": lambda make, good, bad: jax.jit(make)(bad),
    "filter_jit": lambda make, good, bad: eqx.filter_jit(make)(bad),
    # only the second member is bad; error_if reports the batch
    "vmap": lambda make, good, bad: jax.vmap(make)(jnp.stack([jnp.asarray(good), bad])),
}


def _eager_message(make, bad, match):
    with pytest.raises(ValueError, match=match) as info:
        make(bad)
    # the eager message adds the offending values after " Got "; the rest is shared
    return str(info.value).split(" Got ")[0]


@pytest.mark.parametrize(
    "case,mode",
    [
        (case, mode)
        for case in CASES
        for mode in ("eager", "jit", "vmap", "filter_jit")
        if (mode != "filter_jit" or case[0] in FILTER_JIT)
        and (mode != "vmap" or case[0] not in NOT_VMAPPED)
    ],
    ids=lambda v: v if isinstance(v, str) else v[0],
)
def test_bad_parameters_raise_eagerly_and_traced(case, mode):
    """`ValueError` eagerly; under jit, filter_jit and vmap the runtime error of
    `eqx.error_if` with the same message (less the values the eager one adds)."""
    _, make, good, bad, match = case
    bad = np.asarray(bad, dtype=np.asarray(good).dtype)
    message = _eager_message(make, bad, match)
    if mode == "eager":
        return
    with pytest.raises(RUNTIME) as info:
        jax.block_until_ready(MODES[mode](make, good, bad))
    assert message in str(info.value)


def test_check_inside_a_jitted_log_prob():
    """The reviewer's example: unnormalised weights under jit used to give -3.009."""
    log_prob = jax.jit(lambda w: jf.GaussianMixture(w, MU, COV).log_prob(jnp.array([1.0, 0.0])))
    with pytest.raises(RUNTIME, match="must sum to one"):
        log_prob(jnp.array([0.3, 0.3]))


LAWS = [
    lambda: jf.GaussianMixture(W, MU, COV * 0.5 + 0.1),
    lambda: jf.GaussianMixture(W, MU, np.array([[0.2, 0.3], [0.4, 0.5]])),
    lambda: jf.Gaussian(np.array([0.5, -0.5]), 0.7),
    lambda: jf.Empirical(MU, np.array([0.25, 0.75])),
    lambda: jf.GaussianNeighbours(W, LO - [[0, 0], [1, 1]], HI, WIDTHS),
]


def test_good_laws_agree_under_transformations():
    """Laws built under jit or vmap (their parameters traced, so checked with
    eqx.error_if) store the arrays of the laws built eagerly."""

    def build():
        return [make() for make in LAWS]

    eager = build()
    for built in (
        jax.jit(build)(),
        jax.tree.map(lambda a: a[0], jax.vmap(lambda _: build())(jnp.zeros(1))),
    ):
        assert jax.tree.structure(built) == jax.tree.structure(eager)
        for got, want in zip(jax.tree.leaves(built), jax.tree.leaves(eager), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: jf.Empirical(np.zeros((0, 2))), "at least one point"),
        (lambda: jf.Empirical(np.zeros((3, 0))), "n >= 1"),
        (lambda: jf.GaussianMixture(np.ones(0), np.zeros((0, 2)), np.ones(0)), "at least one"),
        (lambda: jf.GaussianMixture(np.ones(1), np.zeros((1, 0)), np.ones(1)), "n >= 1"),
        (lambda: jf.Gaussian(np.zeros(0), 1.0), "n >= 1"),
        (lambda: jf.GaussianNeighbours(W[:0], LO[:0], HI[:0], WIDTHS[:0]), "at least one box"),
        (lambda: jf.GaussianNeighbours(W, LO, LO, WIDTHS), "lower < upper"),
        (lambda: jf.GaussianMixture(W, MU, COV * [1, np.nan]), "NaN"),
        (lambda: jf.Gaussian(np.zeros(2) + 0j, 1.0), "must be real"),
        (lambda: jf.Empirical(np.ones((2, 2)) * 1j), "must be real"),
        # a float32 mean and a covariance that rounds to a singular one in float32
        (lambda: jf.Gaussian(np.zeros(2, F32), _rotated([1.0, 1e-9], F32)), "add eps"),
    ],
)
def test_other_bad_laws(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_dtype_policy():
    """One floating dtype per law: the result type of its inputs."""
    law = jf.GaussianMixture(W.astype(F32), MU, np.ones(2, F32))
    assert law.weights.dtype == law.means.dtype == law.eigvals.dtype == jnp.float64
    law = jf.Gaussian(np.zeros(2, F32), np.eye(2, dtype=F32))
    assert law.mixture.eigvals.dtype == law.mixture.eigvecs.dtype == jnp.float32
    law = jf.Gaussian(np.zeros(2, int), 1)
    assert law.mean.dtype == jnp.result_type(float)
    law = jf.GaussianNeighbours(W.astype(F32), LO.astype(F32), HI.astype(F32), WIDTHS.astype(F32))
    assert {a.dtype for a in jax.tree.leaves(law)} == {jnp.dtype(F32)}
    # weights normalised in float32 are accepted in a float64 law (the tolerance is
    # that of the dtype they were given in), and float64 ones rounded to float32
    w = np.array([1, 2], F32) / F32(3)
    assert abs(float(np.sum(w, dtype=np.float64)) - 1) > 1e-8  # not one in float64
    jf.GaussianMixture(w, MU, COV)
    law = jf.Empirical(MU.astype(F32), np.array([0.1, 0.9]).astype(F32))
    assert law.weights.dtype == jnp.float32
    # both sides of the float32 floors
    jf.Gaussian(np.zeros(2, F32), _rotated([1.0, 1e-5], F32))
    jf.Gaussian(np.zeros(2, F32), np.float32(2e-38))
    with pytest.raises(ValueError, match="> 0"):
        jf.Gaussian(np.zeros(2, F32), np.float32(1e-39))


def test_path_parameters():
    """Paths keep static Python-float parameters: traced ones are refused, NumPy
    numbers accepted, and no accepted value gives a path that lies."""
    for make in (jf.OrnsteinUhlenbeck, jf.Cosine):
        with pytest.raises(ValueError, match="concrete number"):
            jax.jit(lambda v, make=make: make(v).alpha(0.5))(1.0)
        with pytest.raises(ValueError, match="concrete number"):
            jax.vmap(lambda v, make=make: make(v).alpha(0.5))(jnp.ones(2))
    for bad, match in [(np.nan, "finite"), (-1.0, "> 0")]:
        with pytest.raises(ValueError, match=match):
            jf.OrnsteinUhlenbeck(bad)
    for bad in (True, 1j, np.ones(2)):
        # the runtime type checker of the test suite refuses them first
        with pytest.raises((ValueError, TypeError)):
            jf.OrnsteinUhlenbeck(bad)
    assert jf.OrnsteinUhlenbeck(np.float32(2.0)).t_noise == 2.0
    assert jf.OrnsteinUhlenbeck(jnp.array(3)).t_noise == 3.0
    with pytest.raises(ValueError, match="RectifiedFlow runs on"):
        jf.RectifiedFlow(2.0)
    with pytest.raises(ValueError, match="<= 1e"):
        jf.Cosine(1e7)
    # the cosine schedule reaches alpha = 0 in float32 (the rounded pi/2 gave -4e-8),
    # and stays accurate for a large offset (float32 gave alpha = -2.8 at d = 1e8)
    for d in (0.0, 0.008, 1e6):
        path = jf.Cosine(d)
        assert float(path.alpha(jnp.float32(1.0))) == 0.0
        t = jnp.linspace(0, 1, 11, dtype=jnp.float32)
        k = np.pi / 2 / (1 + d)
        want = np.sin(k * (1 - np.asarray(t, np.float64))) / np.sin(k)
        np.testing.assert_allclose(path.alpha(t), want, atol=1e-6)
        np.testing.assert_allclose(path.alpha(t) ** 2 + path.sigma(t) ** 2, 1, atol=1e-6)
    # OU's drift stays -1 where exp(-t) underflows
    path = jf.OrnsteinUhlenbeck(200.0)
    assert float(path.drift_coefficient(jnp.float32(200.0))) == -1.0
    assert float(path.diffusion_squared(jnp.float32(200.0))) == pytest.approx(2.0)


# ---- no NaN from a law that constructs -------------------------------------------

PATHS = [jf.RectifiedFlow(), jf.OrnsteinUhlenbeck(4.0), jf.Cosine()]
N, K = 2, 2  # fixed shapes: one compilation of _evaluate per kind of law and dtype


@st.composite
def edge_laws(draw):
    """A float32 or float64 law drawn near the floors: smallest eigenvalues within a
    factor 30 of `n eps` times the largest, variances and widths within a factor 30 of
    the smallest normal number (or its square root), weights down to `sqrt(tiny)`,
    box sides a few `eps` long. Returns `(kind, dtype, construct)`."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    info = np.finfo(dtype)
    kind = draw(st.sampled_from(["full", "diag", "iso", "empirical", "neighbours"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = np.exp(rng.uniform(np.log(info.tiny) / 2, 0, K))
    w = (w / w.sum()).astype(dtype)
    means = rng.uniform(-1, 1, (K, N)).astype(dtype)

    def near(floor, size=None):  # within a factor 30 of a floor, on either side
        return floor * np.exp(rng.uniform(-np.log(30), np.log(30), size))

    scale = 10.0 ** draw(st.floats(-3, 3))
    if kind == "full":
        q = np.linalg.qr(rng.standard_normal((K, N, N)))[0]
        lam = scale * np.stack([near(N * info.eps, K), np.ones(K)], -1)
        cov = np.einsum("kij,kj,klj->kil", q, lam, q).astype(dtype)
        return kind, dtype, lambda: jf.GaussianMixture(w, means, cov)
    if kind in ("diag", "iso"):
        var = near(info.tiny, (K, N) if kind == "diag" else K)
        var = np.where(rng.uniform(size=var.shape) < 0.5, var, scale).astype(dtype)
        return kind, dtype, lambda: jf.GaussianMixture(w, means, var)
    if kind == "empirical":
        return kind, dtype, lambda: jf.Empirical(means, w)
    side = np.maximum(np.abs(means), 1) * near(info.eps, (K, N))
    widths = np.array([near(np.sqrt(info.tiny)), scale * 1e-3], dtype)
    upper = (means + side).astype(dtype)
    return kind, dtype, lambda: jf.GaussianNeighbours(w, means, upper, widths)


@eqx.filter_jit
def _evaluate(law, x, alpha, sigma):
    """`log p_t` and the posterior at every point and every `(alpha, sigma)`."""
    xs = jnp.repeat(x, alpha.shape[0], 0)
    a, s = jnp.tile(alpha, x.shape[0]), jnp.tile(sigma, x.shape[0])
    return jax.vmap(law.marginal_log_prob)(xs, a, s), jax.vmap(law.posterior)(xs, a, s)


@functools.cache
def _coefficients(dtype, dirac):
    """`(alpha, sigma)` of every path at its data end (for a Dirac law, which has no
    score there, the smallest time whose `sigma^2` is a normal number), that time, its
    middle and its noise end."""
    small = 4 * np.sqrt(np.finfo(dtype).tiny)
    ts = [(p, t) for p in PATHS for t in (small if dirac else 0.0, small, 0.5, 1.0)]
    alpha = [float(p.alpha(t * p.t_noise)) for p, t in ts]
    sigma = [float(p.sigma(t * p.t_noise)) for p, t in ts]
    return jnp.asarray(alpha, dtype), jnp.asarray(sigma, dtype)


@settings(max_examples=30, deadline=None)
@given(edge_laws(), st.integers(0, 2**32 - 1))
def test_a_law_that_constructs_gives_no_nan(drawn, seed):
    """At finite points near the law (within 2 of a mean, point or box) and at the
    ends and middle of each path: `log p_t` is never NaN (it is -inf where the density
    underflows the dtype), and the posterior is never NaN where `log p_t` is finite."""
    kind, dtype, construct = drawn
    try:
        law = construct()
    except ValueError:
        return  # refused, with a message: nothing to evaluate
    rng = np.random.default_rng(seed)
    centre = getattr(law, {"empirical": "points", "neighbours": "lower"}.get(kind, "means"))
    x = np.asarray(centre)[rng.integers(K, size=6)] + rng.uniform(-2, 2, (6, N))
    x[0] = centre[0]  # on a mean, a point or a corner
    log_p, (d, score) = _evaluate(
        law, jnp.asarray(x, dtype), *_coefficients(dtype, kind == "empirical")
    )
    leaves = [np.asarray(v).tolist() for v in jax.tree.leaves(law)]
    assert not jnp.any(jnp.isnan(log_p)), (log_p, leaves)
    finite = jnp.isfinite(log_p)[:, None]
    assert not jnp.any(finite & (jnp.isnan(d) | jnp.isnan(score))), (d, score, leaves)


def test_far_from_a_law_at_its_floors():
    """Where the density underflows the dtype, `log p` is -inf and the posterior is
    not NaN (each case gave NaN before)."""
    box = [[-0.5 + 1e-16] * 2, [1, 1]]
    for law, x, want_log_p, want_d in [
        # one component: softmax of a single -inf logit; lam * (C^-1 y) overflowing
        (jf.Gaussian(np.zeros(2, F32), F32(1e-37)), [10.0, 0.0], -np.inf, [10.0, 0.0]),
        # Empirical at a small sigma: every d^2 / sigma^2 overflows float32
        (jf.Empirical(np.array([[0, 0], [1, 0]], F32)), [100.0, 0.0], None, [1.0, 0.0]),
        # a box a few eps wide with a width near sqrt(tiny), far away: (width * mid)^2
        (
            jf.GaussianNeighbours([0.9, 0.1], [[-0.5, -0.5], [0, 0]], box, [2e-154, 0.1]),
            [2.5, 0.0],
            None,
            None,
        ),
    ]:
        dtype = jax.tree.leaves(law)[0].dtype
        # at the data end (for Empirical, the smallest sigma of _coefficients)
        dirac = isinstance(law, jf.Empirical)
        x = jnp.tile(jnp.asarray(x, dtype), (6, 1))  # _evaluate's shapes, compiled once
        log_p, (d, score) = _evaluate(law, x, *_coefficients(dtype, dirac))
        assert not jnp.isnan(log_p[0]) and (want_log_p is None or log_p[0] == want_log_p)
        assert not jnp.any(jnp.isnan(d[0]) | jnp.isnan(score[0]))
        if want_d is not None:
            np.testing.assert_allclose(d[0], want_d, rtol=1e-6)
