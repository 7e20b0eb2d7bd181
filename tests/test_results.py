"""throw=False: one point that cannot be solved costs only itself, with its cause."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxflow as jf

# On the paper 000 Fig. 3 mixture Dopri5 at rtol 1e-8 needs 31 and 32 steps from
# the corners and 45 on the ridge between the upper modes' basins: max_steps=40
# solves the corners and not the ridge.
FIELD = jf.AnalyticField(jf.data.fig3_mixture(), jf.RectifiedFlow())
CORNERS = jnp.array([[2.0, 2.0], [-2.0, -2.0]])
RIDGE = jnp.array([0.0, 0.05])
BATCH = jnp.stack([CORNERS[0], RIDGE, CORNERS[1], jnp.array([jnp.nan, 0.0])])
GOOD = np.array([True, False, True, False])
MAX_STEPS = 40


def _check_batch(out, reference):
    """Good points equal their own throw=True solve; bad ones are NaN."""
    np.testing.assert_array_equal(np.asarray(out.ok), GOOD)
    assert bool((out.result == jf.RESULTS.max_steps_reached)[1])
    assert bool((out.result == jf.RESULTS.invalid_input)[3])
    for leaf, ref in zip(jax.tree.leaves(out.value), jax.tree.leaves(reference), strict=True):
        leaf = np.asarray(leaf)
        np.testing.assert_allclose(leaf[GOOD], np.asarray(ref), rtol=1e-12, atol=1e-14)
        assert np.all(np.isnan(leaf[~GOOD]))


ENTRY_POINTS = {
    "generate": lambda z, **kw: jf.generate(FIELD, z, **kw),
    "invert": lambda z, **kw: jf.invert(FIELD, 0.3 * z, **kw),
    "reconstruct": lambda z, **kw: jf.reconstruct(FIELD, z, **kw),
    "reconstruction_error": lambda z, **kw: jf.reconstruction_error(FIELD, z, **kw),
    "generate_with_jacobian": lambda z, **kw: jf.generate_with_jacobian(FIELD, z, **kw),
    "log_det_generation": lambda z, **kw: jf.log_det_generation(FIELD, z, **kw),
    "log_det_generation_density": lambda z, **kw: jf.log_det_generation(
        FIELD, z, route="density", **kw
    ),
    "invert_with_log_det": lambda z, **kw: jf.invert_with_log_det(FIELD, 0.3 * z, **kw),
}


@eqx.filter_jit
def _vmapped(name, zs, **kw):
    """`vmap` of an entry point, jitted once per entry point, batch shape and settings
    (eagerly each call compiles again), so tests asking the same share it."""
    return jax.vmap(lambda z: ENTRY_POINTS[name](z, **kw))(zs)


@pytest.mark.parametrize("name", sorted(set(ENTRY_POINTS) - {"invert", "invert_with_log_det"}))
def test_throw_false_keeps_the_good_points(name):
    out = _vmapped(name, BATCH, max_steps=MAX_STEPS, throw=False)
    reference = _vmapped(name, BATCH[GOOD], max_steps=MAX_STEPS)
    _check_batch(out, reference)
    if name in ("generate", "generate_with_jacobian"):  # the others share the code
        # throw=True on the same batch raises, naming the cause of the first failure
        with pytest.raises(Exception, match="max_steps|NaN"):
            jax.block_until_ready(_vmapped(name, BATCH, max_steps=MAX_STEPS))


@pytest.mark.parametrize("name", ["invert", "invert_with_log_det"])
def test_invert_throw_false(name):
    xs = jnp.stack([CORNERS[0], jnp.array([jnp.inf, 0.0])])
    out = _vmapped(name, xs, throw=False)
    np.testing.assert_array_equal(np.asarray(out.ok), [True, False])
    assert bool((out.result == jf.RESULTS.invalid_input)[1])
    reference = jax.tree.map(lambda a: a[0], _vmapped(name, xs[:1]))
    for leaf, ref in zip(jax.tree.leaves(out.value), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(np.asarray(leaf)[0], ref, rtol=1e-12)
        assert np.all(np.isnan(np.asarray(leaf)[1]))


def test_batch_map_with_throw_false():
    fn = lambda z: jf.generate(FIELD, z, max_steps=MAX_STEPS, throw=False)  # noqa: E731
    out = jax.jit(lambda zs: jf.batch_map(fn, zs, batch_size=3))(BATCH)
    # the program test_throw_false_keeps_the_good_points[generate] compiled
    reference = _vmapped("generate", BATCH[GOOD], max_steps=MAX_STEPS)
    _check_batch(out, reference)


def test_jvp_through_a_failed_point_is_nan_not_zero():
    """A where() would give the failed point a zero tangent: a silent E = 0."""

    def g(z):
        return jf.generate(FIELD, z, max_steps=MAX_STEPS, throw=False).value

    u = jnp.array([0.0, 1.0])
    e = np.asarray(jax.jit(jax.vmap(lambda z: jf.intrinsic_instability(g, z, u)))(BATCH[:3]))
    assert np.isnan(e[1]) and np.all(np.isfinite(e[[0, 2]]))
    exact = jax.jit(lambda x: jf.intrinsic_instability(lambda z: jf.generate(FIELD, z), x, u))(
        CORNERS[0]
    )
    np.testing.assert_allclose(e[0], exact, rtol=1e-10)


@pytest.mark.parametrize(
    "start, result, match",
    [
        # NaN where the solve starts: named as the field's fault, found by one more
        # evaluation at the start
        (20.0, "field_non_finite", "velocity is NaN or inf at the starting point"),
        # NaN met on the way (x grows past 10 during the solve): the solution's fault
        (8.0, "non_finite", "solution is not finite"),
    ],
)
def test_non_finite_result(start, result, match):
    """A field that is NaN in part of space: a fixed-step solve runs through, and
    the point is reported by its cause (not as a step-count problem), the others
    kept."""
    network = lambda x, t: jnp.where(x[0] > 10.0, jnp.nan, -1.0) * x  # noqa: E731
    field = jf.LearnedField(network, jf.RectifiedFlow(), "velocity")
    # generation runs backwards in time, so v = -x grows x by a factor of about e
    zs = jnp.array([[1.0, 0.0], [start, 0.0]])
    out = jax.vmap(lambda z: jf.generate(field, z, solver="euler", steps=5, throw=False))(zs)
    np.testing.assert_array_equal(np.asarray(out.ok), [True, False])
    assert bool((out.result == getattr(jf.RESULTS, result))[1])
    np.testing.assert_allclose(out.value[0], jf.generate(field, zs[0], solver="euler", steps=5))
    with pytest.raises(Exception, match=match):
        jf.generate(field, zs[1], solver="euler", steps=5)


def test_samplers_throw_false():
    key = jax.random.PRNGKey(0)
    zs = jnp.stack([CORNERS[0], jnp.array([jnp.nan, 0.0])])
    for sample in (
        lambda z: jf.sample_sde(FIELD, z, key, steps=50, throw=False),
        lambda z: jf.sample_ddpm(FIELD, z, key, steps=50, throw=False),
    ):
        out = jax.jit(jax.vmap(sample))(zs)
        np.testing.assert_array_equal(np.asarray(out.ok), [True, False])
        assert bool((out.result == jf.RESULTS.invalid_input)[1])
        assert np.all(np.isfinite(out.value[0])) and np.all(np.isnan(out.value[1]))


def test_instability_probability_throw_false():
    xs = jnp.array([[0.5, 0.5], [0.2, 0.8], [jnp.nan, 0.1]])
    # jitted: eagerly, each of its many small operations compiles on its own
    probability = eqx.filter_jit(jf.instability_probability)
    out = probability(FIELD, xs, [1.0, 2.0], throw=False)
    np.testing.assert_array_equal(np.asarray(out.ok), [True, True, False])
    reference = probability(FIELD, xs[:2], [1.0, 2.0])
    for name in ("p_m", "eps", "delta", "bound"):
        np.testing.assert_allclose(getattr(out.value, name), getattr(reference, name))
    np.testing.assert_allclose(out.value.log_ebar[:2], reference.log_ebar, rtol=1e-12)
    assert np.isnan(out.value.log_ebar[2])


def test_throw_must_be_a_bool():
    # a TypeError from the jaxtyping hook in the tests, a ValueError without it
    with pytest.raises((ValueError, TypeError), match="throw"):
        jf.generate(FIELD, CORNERS[0], throw="no")


def test_progress_meter_passes_through(capfd):
    x = jf.generate(FIELD, CORNERS[0], progress_meter=diffrax.TextProgressMeter())
    np.testing.assert_allclose(x, jf.generate(FIELD, CORNERS[0]), rtol=1e-14)
    assert "100.00%" in capfd.readouterr().out


def test_result_messages_per_point():
    results = jax.vmap(
        lambda ok: jf.RESULTS.where(ok, jf.RESULTS.successful, jf.RESULTS.max_steps_reached)
    )(jnp.array([True, False, True]))
    messages = jf.result_messages(results)
    assert messages.shape == (3,)
    assert messages[0] == messages[2] == ""
    assert "max_steps" in messages[1]
    assert "not finite" in str(jf.result_messages(jf.RESULTS.non_finite))
    with pytest.raises(ValueError, match="takes a jf.RESULTS"):
        jf.result_messages(np.zeros(3))
