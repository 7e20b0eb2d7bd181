"""The jaxtyping annotations are checked at run time in the test suite.

pyproject.toml runs pytest with jaxtyping's import hook
(`--jaxtyping-packages=jaxflow,beartype.beartype`), which wraps every function
and dataclass of the package in `jaxtyped(typechecker=beartype)`. A wrong shape
at a public boundary then fails a test instead of broadcasting silently for a
user. These tests check that the checking is on, that it catches such shapes,
and that it admits what users legitimately pass.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

import jaxflow as jf

# The hook wraps each function with `functools.wraps`, which leaves `__wrapped__`;
# without it (`-p no:jaxtyping`, or `-o addopts=""`) there is nothing to test here.
HOOKED = hasattr(jf.ddpm_step, "__wrapped__")
pytestmark = pytest.mark.skipif(not HOOKED, reason="the jaxtyping import hook is not active")

PATH = jf.RectifiedFlow()
FIELD = jf.AnalyticField(jf.Gaussian(jnp.zeros(2), jnp.eye(2)), PATH)


def test_mismatched_point_shapes_fail():
    # the hook meets a (1,) denoiser for a (3,) state before the step's own check
    # (tests/test_input_checks.py) does
    with pytest.raises(TypeCheckError, match="x0_bar"):
        jf.ddpm_step(PATH, jnp.zeros(3), 0.5, 0.4, jnp.ones(1), jnp.zeros(3))
    with pytest.raises(TypeCheckError, match="noise"):
        jf.reverse_sde_step(FIELD, jnp.zeros(2), 0.5, 0.01, jnp.zeros(1))


def test_a_batch_of_times_where_one_time_is_expected_fails():
    # unchecked, a (2,) time would broadcast against the point's coordinates
    with pytest.raises(TypeCheckError, match="parameter 't'"):
        FIELD.velocity(jnp.zeros(2), jnp.array([0.3, 0.6]))
    with pytest.raises(TypeCheckError, match="parameter 't'"):
        jax.jit(lambda x, t: FIELD.score(x, t))(jnp.zeros(2), jnp.array([0.3, 0.6]))


class _WrongLength(jf.AbstractVelocityField):
    """A user's field whose velocity has the wrong length (a network's output is
    checked by `LearnedField` itself; a hand-written field meets the annotation)."""

    path: jf.AbstractPath = PATH

    @property
    def dim(self):
        return None

    def velocity_unchecked(self, x, t):
        return jnp.sum(x, keepdims=True)


def test_a_velocity_of_the_wrong_size_fails():
    # a (1,) velocity for a (2,) point would broadcast in the solver's update
    with pytest.raises(TypeCheckError, match="return"):
        _WrongLength().velocity(jnp.zeros(2), 0.5)


def test_legitimate_inputs_pass():
    # Python ints as times, NumPy points and grids, a list of thresholds
    assert FIELD.velocity(jnp.ones(2), 1).shape == (2,)
    assert PATH.diffusion_squared(jnp.linspace(0.1, 0.9, 4)).shape == (4,)
    z = np.array([0.3, -0.2])
    x = jf.generate(FIELD, z, solver="euler", steps=4, t_noise=1, t_data=0)
    assert x.shape == (2,)
    assert jf.invert(FIELD, z, times=np.linspace(0.0, 1.0, 5), solver="euler").shape == (2,)
    stats = jf.instability_probability(FIELD, np.zeros((3, 2)), [1.0, 2.0], steps=4, solver="euler")
    assert stats.p_m.shape == (2,)
