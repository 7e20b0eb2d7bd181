"""Every bad input raises an error that names the fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxflow as jf

GOOD_W = np.array([0.5, 0.5])
GOOD_MU = np.zeros((2, 2))
GOOD_COV = np.stack([np.eye(2)] * 2)


@pytest.mark.parametrize(
    "make,match",
    [
        (
            lambda: jf.GaussianMixture(np.array([0.5, 0.5, 0.0]), GOOD_MU, GOOD_COV),
            "one weight per component",
        ),
        (lambda: jf.GaussianMixture(np.array([1.5, -0.5]), GOOD_MU, GOOD_COV), "> 0"),
        (lambda: jf.GaussianMixture(np.array([0.3, 0.3]), GOOD_MU, GOOD_COV), "sum to one"),
        (
            lambda: jf.GaussianMixture(GOOD_W, GOOD_MU, np.stack([np.eye(3)] * 2)),
            r"shape \(2, 2, 2\)",
        ),
        (
            lambda: jf.GaussianMixture(GOOD_W, GOOD_MU, np.stack([[[1.0, 0.5], [0.0, 1.0]]] * 2)),
            "symmetric",
        ),
        (
            lambda: jf.GaussianMixture(GOOD_W, GOOD_MU, np.stack([[[1.0, 2.0], [2.0, 1.0]]] * 2)),
            "positive definite",
        ),
        (lambda: jf.GaussianMixture(GOOD_W, GOOD_MU, np.array([1.0, 0.0])), "> 0"),
        (lambda: jf.GaussianMixture(GOOD_W, GOOD_MU, np.array([[1.0, 1.0], [1.0, -1.0]])), "> 0"),
        (
            lambda: jf.GaussianMixture(GOOD_W, np.array([[0.0, np.nan], [0.0, 0.0]]), GOOD_COV),
            "NaN",
        ),
        (lambda: jf.Gaussian(np.zeros(2), np.eye(3)), r"shape \(2, 2\)"),
        (lambda: jf.Gaussian(np.zeros(2), -np.eye(2)), "positive definite"),
        (lambda: jf.Gaussian(np.zeros((2, 2)), np.eye(2)), "dimension"),
        (lambda: jf.Empirical(np.zeros((3, 2)), np.array([0.5, 0.5])), "one weight per point"),
        (lambda: jf.Empirical(np.zeros((2, 2)), np.array([1.0, 0.0])), "> 0"),
        (lambda: jf.Empirical(np.zeros(3)), "dimension"),
        (
            lambda: jf.GaussianNeighbours(
                GOOD_W, np.zeros((2, 2)), np.ones((2, 2)), np.array([0.1, 0.0])
            ),
            "widths",
        ),
        (
            lambda: jf.GaussianNeighbours(
                GOOD_W, np.ones((2, 2)), np.ones((2, 2)), np.array([0.1, 0.1])
            ),
            "lower < upper",
        ),
        (
            lambda: jf.GaussianNeighbours(
                GOOD_W, np.zeros((2, 2)), np.ones((2, 3)), np.array([0.1, 0.1])
            ),
            "same shape",
        ),
        # ragged lists (rows of different lengths): NumPy's "inhomogeneous shape" before
        (
            lambda: jf.GaussianMixture(GOOD_W, GOOD_MU, [[1, 1], [1]]),
            r"GaussianMixture covariances is ragged: entry \[0\] has shape \(2,\) but entry "
            r"\[1\] has shape \(1,\)\. Pass a rectangular array of shape .*\(K, n\) \(diagonal\)",
        ),
        (
            lambda: jf.GaussianMixture(GOOD_W, [[0.0, 0.0], [1.0]], GOOD_COV),
            r"GaussianMixture means is ragged.*\(K, n\)",
        ),
        (
            lambda: jf.Gaussian([0.0, 0.0], [[1.0, 0.0], [0.0]]),
            r"Gaussian covariance is ragged: entry \[0\] has shape \(2,\) but entry \[1\]",
        ),
        (
            lambda: jf.Empirical([[0.0, 0.0], [1.0, 1.0, 1.0]]),
            r"Empirical points is ragged.*\(N, n\)",
        ),
        (
            lambda: jf.GaussianNeighbours(
                GOOD_W, [[0.0, 0.0], [[1.0], 0.0]], np.ones((2, 2)), np.array([0.1, 0.1])
            ),
            r"GaussianNeighbours lower is ragged: entry \[1\]\[0\] has shape \(1,\) but "
            r"entry \[1\]\[1\] has shape \(\)",
        ),
        (lambda: jf.OrnsteinUhlenbeck(-1.0), "> 0"),
        (lambda: jf.Cosine(-0.01), ">= 0"),
        (lambda: jf.AnalyticField(jf.RectifiedFlow(), jf.RectifiedFlow()), "AbstractLaw"),
    ],
)
def test_construction_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.fixture(scope="module")
def field():
    return jf.AnalyticField(
        jf.GaussianMixture(GOOD_W, np.array([[0.0, 0.0], [1.0, 1.0]]), GOOD_COV), jf.RectifiedFlow()
    )


def test_solve_argument_errors(field):
    z = jnp.zeros(2)
    with pytest.raises(ValueError, match="steps"):
        jf.generate(field, z, solver="euler")
    with pytest.raises(ValueError, match="unknown solver"):
        jf.generate(field, z, solver="rk99")
    with pytest.raises(ValueError, match="outside the path's range"):
        jf.generate(field, z, t_noise=1.5)
    with pytest.raises(ValueError, match="must be greater than t_data"):
        jf.generate(field, z, t_noise=0.0)
    with pytest.raises(ValueError, match="shape"):
        jf.generate(field, jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="n = 2"):
        jf.generate(field, jnp.zeros(3))
    with pytest.raises(ValueError, match="rtol"):
        jf.generate(field, z, rtol=-1.0)
    with pytest.raises(ValueError, match="positive int"):
        jf.generate(field, z, solver="euler", steps=0)


def test_nan_and_time_errors_under_jit(field):
    with pytest.raises(Exception, match="NaN"):
        jax.jit(lambda z: jf.generate(field, z))(jnp.array([jnp.nan, 0.0]))
    with pytest.raises(Exception, match="outside the path's range"):
        jax.jit(lambda x, t: field.velocity(x, t))(jnp.zeros(2), 1.5)
    with pytest.raises(Exception, match="outside the path's range"):
        field.score(jnp.zeros(2), -0.1)
    with pytest.raises(Exception, match="outside the path's range"):
        jax.jit(lambda z, t: jf.generate(field, z, t_noise=t))(jnp.zeros(2), 1.5)
    with pytest.raises(Exception, match="NaN"):
        field.denoise(jnp.array([jnp.inf, 0.0]), 0.5)


def test_empirical_has_no_density():
    with pytest.raises(ValueError, match="no density"):
        jf.Empirical(np.zeros((2, 2))).log_prob(jnp.zeros(2))


def test_analysis_argument_errors(field):
    fn = lambda z: jf.generate(field, z)  # noqa: E731
    with pytest.raises(ValueError, match="one point"):
        jf.jacobian(fn, jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="direction u"):
        jf.intrinsic_instability(fn, jnp.zeros(2), jnp.zeros(3))
    with pytest.raises(Exception, match="non-zero"):
        jf.instability_coefficient(fn, jnp.zeros(2), jnp.zeros(2))
    with pytest.raises(ValueError, match="route"):
        jf.log_det_generation(field, jnp.zeros(2), route="magic")
    with pytest.raises(Exception, match="M must be > 0"):
        jf.instability_probability(field, jnp.zeros((3, 2)), 0.0)


def test_reverse_mode_through_generate_names_the_adjoint(field):
    """`jax.grad` through `generate`'s default forward-mode solve says what to pass,
    while tracing (nothing compiled). Following the advice works:
    test_solve_checks.py::test_reverse_mode_with_a_reverse_adjoint."""

    def loss(z):
        return jf.generate(field, z, solver="euler", steps=2).sum()

    with pytest.raises(
        RuntimeError, match=r"jaxflow\.generate: .*adjoint=diffrax\.RecursiveCheckpointAdjoint"
    ) as info:
        jax.eval_shape(jax.grad(loss), jnp.zeros(2))
    assert "jf.generation_map(field, solver=" in str(info.value)


def test_ragged_points_name_the_argument(field):
    """A ragged list as a point or a batch names the entry point and the rows, as
    for the laws (nothing is solved: the check comes first)."""
    ragged = [[0.0, 1.0], [2.0]]
    # as users run them: the test run's annotation checks refuse a list first
    plain = lambda f: getattr(f, "__wrapped__", f)  # noqa: E731
    for run, match in [
        (lambda: plain(jf.generate)(field, ragged), r"generate: the point is ragged"),
        (lambda: plain(jf.jacobian)(lambda x: x, ragged), r"jacobian: x is ragged"),
        (
            lambda: plain(jf.batch_generate)(field, ragged),
            r"batch_generate: zs is ragged",
        ),
    ]:
        with pytest.raises(
            ValueError,
            match=match + r": entry \[0\] has shape \(2,\) but entry "
            r"\[1\] has shape \(1,\)\. Pass a rectangular array of shape",
        ):
            run()
