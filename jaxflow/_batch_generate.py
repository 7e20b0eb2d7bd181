"""Generation of a whole batch of points: the lanes laid out by a schedule, the
points spread over every device."""

import abc

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import ArrayLike, Float, Real

from ._batching import chunk_size, resolve_mesh, shard_blocks
from ._fields import AbstractVelocityField
from ._lanes import LaneStats, chunked_solve, joint_solve, max_point_rms, refill_solve
from ._logdet import variational_rhs
from ._misc import as_array, check_bool, check_positive_int, check_time, describe, time_in_range
from ._results import RESULTS, Outcome, all_finite, classify, mask_failed
from ._solve import (
    DEFAULT_MAX_STEPS,
    adaptive_controller,
    cast_like,
    check_max_steps,
    concrete_time,
    get_solver,
    raise_or_outcome,
    singular_end,
    span,
    state_dtype,
)


class AbstractSchedule(eqx.Module):
    """How a batch of adaptive solves is laid on a device's vector lanes
    (docs/batching.md). Every schedule gives each point the same tolerance; they
    differ in the work wasted on lanes that wait.

    - `lanes`: points solved side by side on one device; `None` chooses from the
      batch and the device count (`jf.chunk_size`).
    """

    lanes: eqx.AbstractVar[int | None]

    def __check_init__(self):
        if self.lanes is not None:
            check_positive_int("lanes", self.lanes)

    @abc.abstractmethod
    def solve(self, f, y0s, *, t0, t1, solver, controller, max_steps, lanes):
        """`(final states, RESULTS codes, LaneStats)` of `dy/dt = f(t, y)` from `t0`
        to `t1 > t0` for every point of `y0s`."""

    def norm(self):
        """The error norm the step-size controller needs; `None` for diffrax's."""
        return None

    def lane_cap(self, backend: str) -> int | None:
        """The most lanes a device gets when `lanes` is `None`; `None` for
        `jf.chunk_size`'s default."""
        return None


class LaneRefill(AbstractSchedule):
    """A lane whose point is done takes the next point: one loop over
    `solver.step` and the controller's `adapt_step_size` (diffrax's own), each
    point under its own step-size control. Results equal `jax.vmap` of the
    single-point solve; no lane waits until the points run out (99% useful work on
    paper 000's Fig. 3 grid, against 42% for one `vmap`). The default."""

    lanes: int | None = None

    def solve(self, f, y0s, **kwargs):
        return refill_solve(f, y0s, **kwargs)


class Chunks(AbstractSchedule):
    """Chunks of `lanes` points, each a `vmap` of `diffrax.diffeqsolve` that runs
    until its slowest point is done (what `jf.batch_map` does). Results equal
    `jax.vmap` of the single-point solve."""

    lanes: int | None = None

    def solve(self, f, y0s, **kwargs):
        return chunked_solve(f, y0s, **kwargs)


class JointSteps(AbstractSchedule):
    """Chunks of `lanes` points (by default at most 128 on CPU) that share every
    step, as torchdiffeq steps a batch; the error norm is the largest per-point
    RMS norm, so every point meets its tolerance (torchdiffeq's RMS over the
    whole batch does not promise that). No lane idles, but every point takes the
    steps its hardest neighbour needs (1.6-1.9x the evaluations on paper 000's
    Fig. 3 grid), and a chunk fails as a whole. It wins where a step's
    bookkeeping costs more than the field's evaluations (cheap analytic fields:
    1.2-1.4x faster than `LaneRefill` on that grid)."""

    lanes: int | None = None

    def solve(self, f, y0s, **kwargs):
        return joint_solve(f, y0s, **kwargs)

    def norm(self):
        return max_point_rms

    def lane_cap(self, backend):
        # a shared step is as small as the chunk's hardest point needs: on CPU
        # 128 lanes waste fewer steps than 256 and still fill the vector units
        # (docs/batching.md)
        return 128 if backend == "cpu" else None


def _check_zs(field, zs, name):
    if not isinstance(field, AbstractVelocityField):
        raise ValueError(f"{name} needs a jaxflow field, got {type(field).__name__}.")
    zs = jnp.asarray(as_array(f"{name}: zs", zs, "(N, n)"))
    if zs.ndim != 2:
        raise ValueError(
            f"{name} takes a batch of points of shape (N, n), got shape {zs.shape}; "
            f"for one point use jf.generate."
        )
    if field.dim is not None and zs.shape[1] != field.dim:
        raise ValueError(
            f"{name}: points have length {zs.shape[1]}, the field's law has n = {field.dim}."
        )
    if not jnp.issubdtype(zs.dtype, jnp.floating):
        if jnp.issubdtype(zs.dtype, jnp.complexfloating):
            raise ValueError(f"{name} takes real points, got dtype {zs.dtype}.")
        zs = zs.astype(jnp.result_type(float))
    return zs


def batch_generate(
    field: AbstractVelocityField,
    zs: Float[ArrayLike, "N n"],
    *,
    jacobian: bool = False,
    schedule: AbstractSchedule | None = None,
    mesh: Mesh | str | None = "auto",
    solver="dopri5",
    rtol: Real[ArrayLike, ""] | None = None,
    atol: Real[ArrayLike, ""] | None = None,
    max_steps: int | np.integer = DEFAULT_MAX_STEPS,
    t_noise: Real[ArrayLike, ""] | None = None,
    t_data: Real[ArrayLike, ""] | None = None,
    adjoint: diffrax.ForwardMode | None = None,
    throw: bool = True,
    stats: bool = False,
):
    """`G(z)` for a whole batch of points (paper 000 Def. 2.1), with `J_G(z)` if
    asked, on every device and with no lane left waiting.

    Equal to `jax.vmap(lambda z: jf.generate(field, z, ...))(zs)` (or
    `generate_with_jacobian`) with the default schedule, and faster: one `vmap` of
    an adaptive solve runs every lane until the slowest point is done, while
    `LaneRefill` hands a finished lane the next point (docs/batching.md measures
    each schedule on paper 000's Fig. 3 grid).

    **Arguments:**

    - `field`: any field (`AbstractVelocityField`).
    - `zs`: the points, shape `(N, n)`.
    - `jacobian`: also return `J_G(z)`, from the variational equation under error
      control (as `jf.generate_with_jacobian`).
    - `schedule`: `jf.LaneRefill()` (default), `jf.Chunks()` or `jf.JointSteps()`;
      each takes `lanes=`, the points solved side by side on one device.
    - `mesh`: as `jf.batch_map`'s: `'auto'` (default) spreads the points over every
      device of this process (`jf.use_cpu_devices()` makes one per CPU core).
    - `solver`: an adaptive solver, `'dopri5'` (default) or `'tsit5'` or `'dopri8'`,
      or a `diffrax.AbstractAdaptiveSolver`. Fixed-step solves take equal steps on
      every lane: batch them with `jf.batch_map`.
    - `rtol, atol, max_steps, t_noise, t_data`: as for `jf.generate`.
    - `adjoint`: `None` (default) for no derivatives through the solves, the
      fastest; `diffrax.ForwardMode()` lets `jax.jvp` and `jax.jacfwd` through every
      schedule, as through `jf.generate` (its Runge-Kutta stages then run in a
      plain loop, 1.3-1.45x slower on XLA:CPU). For `J_G` itself, prefer
      `jacobian=True`: it is under error control.
    - `throw`: `True` (default) raises if any point fails; `False` returns a
      `jf.Outcome` whose `result` says, per point, why it failed (NaN values).
    - `stats`: also return a `LaneStats` (steps per point, lane steps paid and
      the useful-work fraction).

    **Returns:** `xs` of shape `(N, n)`, or `(xs, Js)` with `Js` of shape
    `(N, n, n)`; with `throw=False` an `Outcome` holding it; with `stats=True` a
    pair `(that, LaneStats)`.

    For `jax.grad`, batch `jf.generate` with `jf.batch_map` and a reverse-mode
    adjoint.

    **Raises:** `ValueError` for bad settings or points of the wrong shape; under
    `jit`, `eqx.error_if` naming the cause when a point's solve fails.
    """
    name = "batch_generate"
    throw = check_bool("throw", throw)
    jacobian = check_bool("jacobian", jacobian)
    stats = check_bool("stats", stats)
    schedule = LaneRefill() if schedule is None else schedule
    if not isinstance(schedule, AbstractSchedule):
        raise ValueError(
            f"{name}: schedule must be jf.LaneRefill(), jf.Chunks() or jf.JointSteps(), "
            f"got {describe(schedule)}."
        )
    if adjoint is not None and not isinstance(adjoint, diffrax.ForwardMode):
        raise ValueError(
            f"{name}: adjoint must be None or diffrax.ForwardMode() (forward-mode "
            f"derivatives), got {describe(adjoint)}; for reverse mode, batch jf.generate "
            "with jf.batch_map and diffrax.RecursiveCheckpointAdjoint()."
        )
    zs = _check_zs(field, zs, name)
    # the solver as the user would write it in the advice below
    solver_text = repr(solver) if isinstance(solver, str) else f"diffrax.{type(solver).__name__}()"
    solver = get_solver(solver)
    max_steps = check_max_steps(max_steps)
    t_noise = check_time("t_noise", field.path, t_noise)
    t_data = check_time("t_data", field.path, t_data)
    t_noise, t_data = span(field, t_noise, t_data)
    # batch_generate has no steps=: its schedules exist for adaptive steps, and
    # fixed steps, equal on every lane, batch as well with batch_map
    single = "jf.generate_with_jacobian" if jacobian else "jf.generate"
    fixed_step = (
        f"{name} runs adaptive solves only; for fixed steps batch the single-point "
        f"solve with jf.batch_map, e.g. jf.batch_map(lambda z: {single}(field, z, "
        f"solver={solver_text}, steps=100), zs)"
    )
    controller = adaptive_controller(
        solver, rtol, atol, zs.dtype, schedule.norm(), fixed_step=fixed_step
    )
    mesh = resolve_mesh(mesh, name)
    size = zs.shape[0]
    devices = 1 if mesh is None else mesh.devices.size
    if schedule.lanes is None:
        backend = jax.default_backend()
        lanes = chunk_size(size, devices, backend, schedule.lane_cap(backend))
    else:
        lanes = schedule.lanes

    ok = jnp.all(jnp.isfinite(zs), axis=1)
    for t in (t_noise, t_data):
        if concrete_time("t", t) is None:
            ok = ok & time_in_range(field.path, t)
    compute = jnp.where(ok[:, None], zs, jnp.zeros_like(zs))
    dtype = state_dtype(zs.dtype)
    y0s = compute.astype(dtype)
    if jacobian:
        y0s = (y0s, jnp.broadcast_to(jnp.eye(zs.shape[1], dtype=dtype), (size,) + 2 * zs.shape[1:]))
    rhs = variational_rhs(field) if jacobian else lambda t, x: field.velocity_unchecked(x, t)

    # generation runs from t_noise down to t_data; in s = -t the schedules step
    # forwards, as diffrax does with any backward span
    def f(s, y):
        y_compute = jax.tree_util.tree_map(lambda a: a.astype(zs.dtype), y)
        return jax.tree_util.tree_map(lambda a: -a, cast_like(rhs(-s, y_compute), y))

    s0 = -jnp.asarray(t_noise, dtype)
    s1 = -jnp.asarray(t_data, dtype)

    def block(y0s):
        ys, codes, lane_stats = schedule.solve(
            f,
            y0s,
            t0=s0,
            t1=s1,
            solver=solver,
            controller=controller,
            max_steps=max_steps,
            lanes=lanes,
            forward=adjoint is not None,
        )
        # one evaluation at each start tells a field that is not finite there
        # from a solve that ran out of steps (as jf.generate does)
        start_ok = jax.vmap(lambda y: all_finite(f(s0, y)))(y0s)
        return ys, codes, start_ok, lane_stats.steps, lane_stats.lane_steps[None]

    if size == 0:  # as jax.vmap: empty outputs of the right shapes
        ys, codes, start_ok = y0s, jnp.zeros(0, jnp.int32), jnp.zeros(0, bool)
        steps, lane_steps = jnp.zeros(0, jnp.int32), jnp.zeros(1, jnp.int32)
    elif mesh is None:
        ys, codes, start_ok, steps, lane_steps = block(y0s)
    else:
        ys, codes, start_ok, steps, lane_steps = shard_blocks(block, y0s, mesh, size)
    lane_stats = LaneStats(steps=steps, lane_steps=jnp.sum(lane_steps))

    value = jax.tree_util.tree_map(lambda a: a.astype(zs.dtype), ys)
    singular = singular_end(field, t_noise, t_data)

    def status(v, code, input_ok, start):
        result = eqx.tree_at(lambda r: r._value, RESULTS.successful, code)
        result = classify(v, result, input_ok)
        failed = (result != RESULTS.successful) & (result != RESULTS.invalid_input)
        if singular is not None:
            return RESULTS.where(failed, RESULTS.singular_field, result)
        return RESULTS.where(failed & ~start, RESULTS.field_non_finite, result)

    result = jax.vmap(status)(value, codes, ok, start_ok)
    if throw:
        out = raise_or_outcome(value, result, name, True, singular)
    else:
        out = Outcome(
            value=jax.vmap(mask_failed)(value, result == RESULTS.successful), result=result
        )
    return (out, lane_stats) if stats else out
