"""batch_generate: every schedule against the single-point solves it replaces."""

import diffrax
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import LAWS, PATHS
from hypothesis import given, settings

import jaxflow as jf

TOL = dict(rtol=1e-6, atol=1e-8)


def fig3_field():
    return jf.AnalyticField(jf.data.fig3_mixture(jnp.float64), jf.RectifiedFlow())


def points(n, seed=0, bad=()):
    zs = jax.random.normal(jax.random.PRNGKey(seed), (n, 2)) * 0.6
    for i in bad:
        zs = zs.at[i].set(jnp.nan)
    return zs


def lone(field, zs, jacobian, **kw):
    fn = jf.generate_with_jacobian if jacobian else jf.generate
    return jax.jit(jax.vmap(lambda z: fn(field, z, throw=False, **kw)))(zs)


def batched(field, zs, schedule, jacobian, **kw):
    run = lambda zs: jf.batch_generate(  # noqa: E731
        field, zs, jacobian=jacobian, schedule=schedule, throw=False, stats=True, **kw
    )
    return jax.jit(run)(zs)


@settings(max_examples=6, deadline=None)
@given(
    size=st.integers(1, 23),
    lanes=st.integers(1, 9),
    jacobian=st.booleans(),
    law=st.sampled_from(["mixture_full", "gaussian"]),
    path=st.sampled_from(sorted(PATHS)),
)
@pytest.mark.timeout(180)  # about 5x its idle time on 2 cores
def test_refill_and_chunks_equal_lone_solves(size, lanes, jacobian, law, path):
    """Lane refill and chunks take each point through exactly the steps of its own
    solve: values and per-point results equal `vmap` of `generate` /
    `generate_with_jacobian` to 1e-12, a NaN point included, for any lane count."""
    rng = np.random.default_rng(size * 31 + lanes)
    field = jf.AnalyticField(LAWS[law](rng, 2), PATHS[path])
    bad = (size // 2,) if size > 2 else ()
    zs = points(size, seed=lanes, bad=bad)
    kw = dict(t_data=1e-3) if path == "ornstein_uhlenbeck" else {}
    ref = lone(field, zs, jacobian, **TOL, **kw)
    for schedule in (jf.LaneRefill(lanes=lanes), jf.Chunks(lanes=lanes)):
        out, stats = batched(field, zs, schedule, jacobian, **TOL, **kw)
        np.testing.assert_array_equal(out.result._value, ref.result._value)
        for a, b in zip(jax.tree.leaves(out.value), jax.tree.leaves(ref.value), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, equal_nan=True)
        assert stats.steps.shape == (size,)
        assert int(stats.lane_steps) >= int(np.sum(stats.steps))


def test_steps_are_diffrax_steps_and_refill_wastes_little():
    """The step counts are diffrax's own (`num_steps` of each lone solve); on the
    Fig. 3 law, whose points need from 16 to 39 steps, refill keeps >= 90% of
    lane steps useful where chunks of the same width keep much less, and joint
    steps give every point of a chunk the same count, more steps in all."""
    field = fig3_field()
    zs = jnp.concatenate(
        [points(150, seed=3), jnp.stack([jnp.zeros(10), jnp.linspace(0.5, 0.7, 10)], 1)]
    )

    def steps(z):
        term = diffrax.ODETerm(lambda t, y, a: field.velocity(y, t))
        ctrl = diffrax.PIDController(**TOL)
        return diffrax.diffeqsolve(
            term, diffrax.Dopri5(), 1.0, 0.0, None, z, stepsize_controller=ctrl
        ).stats["num_steps"]

    want = jax.jit(jax.vmap(steps))(zs)
    refill = batched(field, zs, jf.LaneRefill(lanes=16), False, **TOL)[1]
    chunks = batched(field, zs, jf.Chunks(lanes=16), False, **TOL)[1]
    joint = batched(field, zs, jf.JointSteps(lanes=16), False, **TOL)[1]
    np.testing.assert_array_equal(refill.steps, want)
    np.testing.assert_array_equal(chunks.steps, want)
    assert int(want.max()) > 2 * int(want.min())
    assert float(refill.useful_work) > 0.9
    assert float(chunks.useful_work) < float(refill.useful_work) - 0.1
    per_chunk = np.asarray(joint.steps)[:160].reshape(10, 16)
    assert (per_chunk == per_chunk[:, :1]).all()
    # every point takes about its chunk's hardest point's steps: more in all
    assert per_chunk.sum() > 1.2 * int(np.sum(want[:160]))


def test_joint_steps_meet_every_points_tolerance():
    """Shared steps with the max-over-points norm keep every point within the same
    error as its lone solve (against a tight reference); the same solve under an
    RMS norm over the whole chunk (torchdiffeq's default) lets the easy points
    carry a hard one past its tolerance."""
    field = fig3_field()
    zs = jnp.concatenate([points(63, seed=5), jnp.asarray([[0.0, 0.6]])])
    tight = lone(field, zs, True, rtol=1e-12, atol=1e-12).value
    joint = batched(field, zs, jf.JointSteps(lanes=64), True, **TOL)[0].value
    per_point = lone(field, zs, True, **TOL).value

    def error(value):
        x, jac = value
        return np.max(np.abs(x - tight[0]), axis=1) + np.max(
            np.abs(jac - tight[1]) / (1 + np.abs(tight[1])), axis=(1, 2)
        )

    assert np.max(error(joint)) < 3 * np.max(error(per_point)) + 1e-9
    rms = jax.jit(
        lambda zs: jf.batch_generate(
            field, zs, jacobian=True, schedule=_RMSJoint(lanes=64), **TOL, throw=False
        )
    )(zs).value
    assert np.max(error(rms)) > 3 * np.max(error(joint))


class _RMSJoint(jf.AbstractSchedule):
    """JointSteps with diffrax's RMS norm over the whole chunk (the control that
    the max-over-points norm replaces), for the test above."""

    lanes: int | None = None

    def solve(self, f, y0s, **kwargs):
        return jf.JointSteps(lanes=self.lanes).solve(f, y0s, **kwargs)


def test_max_point_rms_is_the_largest_points_rms():
    from jaxflow._lanes import max_point_rms

    rng = np.random.default_rng(0)
    x, jac = rng.standard_normal((5, 3)), rng.standard_normal((5, 3, 3))
    each = np.sqrt((np.sum(x**2, 1) + np.sum(jac**2, (1, 2))) / 12)
    np.testing.assert_allclose(max_point_rms((jnp.asarray(x), jnp.asarray(jac))), each.max())


@pytest.mark.timeout(150)  # about 5x its idle time on 2 cores
def test_failures_are_per_point_and_throw_names_them():
    """A point that runs out of steps fails alone under refill and chunks (its
    neighbours are exact), `throw=True` raises naming the cause, and joint steps
    fail the chunk that holds it."""
    field = fig3_field()
    zs = jnp.concatenate([points(7, seed=1), jnp.asarray([[0.0, 0.6]])])
    ref = lone(field, zs, False, **TOL, max_steps=25)
    assert 0 < int(np.sum(ref.result._value != 0)) < 8
    for schedule in (jf.LaneRefill(lanes=3), jf.Chunks(lanes=3)):
        out, _ = batched(field, zs, schedule, False, **TOL, max_steps=25)
        np.testing.assert_array_equal(out.result._value, ref.result._value)
        np.testing.assert_allclose(out.value, ref.value, rtol=1e-12, equal_nan=True)
    with pytest.raises(Exception, match="max_steps"):
        jax.block_until_ready(jf.batch_generate(field, zs, **TOL, max_steps=25))
    nan = jf.batch_generate(field, points(4, bad=(2,)), throw=False, **TOL)
    assert jf.result_messages(nan.result)[2].startswith("The input")
    value = np.asarray(nan.value)
    assert np.isnan(value[2]).all() and np.isfinite(value[[0, 1, 3]]).all()


def test_empty_batch_and_forward_derivative():
    """No points give empty outputs of the right shapes, as `jax.vmap` does; with
    `adjoint=ForwardMode()` a JVP through refill and chunks is the JVP through the
    lone solves (joint steps take other steps: close)."""
    field = fig3_field()
    x, jac = jf.batch_generate(field, jnp.zeros((0, 2)), jacobian=True)
    assert x.shape == (0, 2) and jac.shape == (0, 2, 2)
    zs, dz = points(5, seed=4), points(5, seed=7)
    _, want = jax.jvp(jax.vmap(lambda z: jf.generate(field, z, **TOL)), (zs,), (dz,))
    for schedule in (jf.LaneRefill(), jf.Chunks(), jf.JointSteps()):

        def run(zs, schedule=schedule):
            return jf.batch_generate(
                field, zs, schedule=schedule, adjoint=diffrax.ForwardMode(), **TOL
            )

        _, tangent = jax.jvp(run, (zs,), (dz,))
        tol = 1e-5 if isinstance(schedule, jf.JointSteps) else 1e-10  # other steps
        np.testing.assert_allclose(tangent, want, rtol=tol, atol=tol)


def test_batch_generate_checks_its_arguments():
    field = fig3_field()
    zs = points(4)
    run = getattr(jf.batch_generate, "__wrapped__", jf.batch_generate)
    cases = [
        (dict(schedule="refill"), "schedule"),
        (dict(solver="euler"), "no error estimate"),
        (dict(jacobian="yes"), "jacobian"),
        (dict(mesh="gpu"), "mesh"),
        (dict(max_steps=None), "max_steps"),
        (dict(rtol=-1.0), "rtol"),
        (dict(adjoint=diffrax.RecursiveCheckpointAdjoint()), "ForwardMode"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            run(field, zs, **kwargs)
    with pytest.raises(ValueError, match=r"\(N, n\)"):
        run(field, zs[0])
    with pytest.raises(ValueError, match="n = 2"):
        run(field, jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="lanes"):
        jf.LaneRefill(lanes=0)


def test_chunk_size_from_batch_and_devices():
    assert jf.chunk_size(40401, 1, "cpu") == 256
    assert jf.chunk_size(40401, 2, "cpu") == 256  # 79 chunks of each device's 20,201
    assert jf.chunk_size(10, 4, "cpu") == 3
    assert jf.chunk_size(40401, 1, "gpu") == 4041
    assert jf.chunk_size(0, 1, "cpu") == 1


def test_use_cpu_devices_after_start_says_how():
    jnp.ones(1).block_until_ready()
    with pytest.raises(ValueError, match="right after `import jax`"):
        jf.use_cpu_devices(2)
