"""Many independent adaptive solves on a fixed set of vector lanes.

Three ways to run `N` solves `dy/dt = f(t, y)` on `L` lanes, all with diffrax's
own solvers and step-size controllers (docs/batching.md):

- `chunked_solve`: chunks of `L` points, each one `vmap` of `diffrax.diffeqsolve`;
  a chunk runs until its slowest point is done, the finished lanes idle.
- `refill_solve`: one loop that drives `solver.step` and
  `controller.adapt_step_size` on every lane; a lane whose point is done (or
  failed) writes it out and takes the next point, so no lane idles until the
  points run out.
- `joint_solve`: chunks of `L` points solved as one system whose steps are shared;
  the error norm is the largest per-point RMS norm, so every point still meets
  its own tolerance, and no lane idles, but every point takes the steps its
  hardest neighbour needs.

Each takes `t0 < t1` (the caller flips time for a backward solve) and returns the
final states, a `RESULTS` code per point and the step counts (per point, and the lane
steps paid, idle ones included).
"""

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int, PyTree

from ._results import RESULTS


class LaneStats(eqx.Module):
    """How much of a batched solve's vector work was useful.

    - `steps`: per point, the steps (accepted and rejected) its own solve took.
    - `lane_steps`: the lane steps paid for, idle and padded lanes included: the
      loop iterations times the lanes.
    """

    steps: Int[Array, " N"]
    lane_steps: Int[Array, ""]

    @property
    def useful_work(self) -> Array:
        """The share of lane steps that advanced a point that was not yet done."""
        return jnp.sum(self.steps) / jnp.maximum(self.lane_steps, 1)


FIRST_STEP = 0.01


def forward_differentiable(solver):
    """`solver` with its stages in a plain `lax` loop, as `diffrax.ForwardMode`
    sets it: a Runge-Kutta solver's default checkpointed loop is a `custom_vjp`,
    which `jax.jvp` cannot enter. On XLA:CPU that loop is the faster one (1.3-1.45x
    on paper 000's Fig. 3 grid), so it is kept unless derivatives are asked for."""
    if isinstance(solver, diffrax.AbstractRungeKutta) and solver.scan_kind is None:
        return eqx.tree_at(lambda s: s.scan_kind, solver, "lax", is_leaf=lambda x: x is None)
    return solver


def _clip_floor(t1):
    # diffrax rounds a step ending within 100 ulps of t1 onto t1, so that no step
    # is left too short to be stable; the same here keeps results equal to its.
    floor = t1
    for _ in range(100):
        floor = jnp.nextafter(floor, jnp.asarray(-jnp.inf, floor.dtype))
    return floor


def _clip_to_end(tprev, tnext, t1, floor, keep):
    return jnp.where(tnext > floor, jnp.where(keep, t1, tprev + 0.5 * (t1 - tprev)), tnext)


def _select(pred, a, b):
    """`a` where the lane's `pred` holds, else `b`, leaf by leaf (lanes on axis 0)."""

    def pick(x, y):
        p = jnp.reshape(pred, pred.shape + (1,) * (jnp.ndim(x) - pred.ndim))
        return jnp.where(p, x, y)

    return jax.tree_util.tree_map(pick, a, b)


def _gather(tree, idx):
    return jax.tree_util.tree_map(lambda a: a[idx], tree)


def refill_solve(
    f: Callable,
    y0s: PyTree[Array],
    *,
    t0,
    t1,
    solver: diffrax.AbstractAdaptiveSolver,
    controller: diffrax.AbstractStepSizeController,
    max_steps: int,
    lanes: int,
    forward: bool = False,
) -> tuple[PyTree[Array], Int[Array, " N"], LaneStats]:
    """Solve `dy/dt = f(t, y)` from `t0` to `t1 > t0` for every point of `y0s`
    (leading axis `N`) on `lanes` lanes that take the next point as they finish.

    Returns the final states, each point's `RESULTS` code (its `_value`) and the
    `LaneStats`. `forward=True` lets `jax.jvp` through (slower: see
    `forward_differentiable`)."""
    size = jax.tree_util.tree_leaves(y0s)[0].shape[0]
    lanes = max(1, min(lanes, size))
    # result codes as plain integers: the loop works on a whole batch of them, and
    # an `RESULTS` item's `where` takes one scalar predicate
    successful = RESULTS.successful._value
    max_steps_reached = RESULTS.promote(diffrax.RESULTS.max_steps_reached)._value
    term = diffrax.ODETerm(lambda t, y, args: f(t, y))
    if forward:
        solver = forward_differentiable(solver)
    error_order = solver.error_order(term)
    floor = _clip_floor(t1)

    def start(y0):
        # diffeqsolve wraps every term, and a wrapped term starts from diffrax's
        # fixed first step, 0.01 (its initial-step search runs only on a bare
        # ODETerm): the same here keeps every point's steps equal to a lone solve's
        tnext, cstate = controller.init(
            term, t0, t1, y0, FIRST_STEP, None, solver.func, error_order
        )
        tnext = jnp.minimum(tnext, t1)
        return tnext, cstate, solver.init(term, t0, tnext, y0, None)

    def step(t, tnext, y, sstate, cstate):
        y1, y_error, _, sstate1, sres = solver.step(term, t, tnext, y, None, sstate, False)
        y_error = jax.tree_util.tree_map(lambda e: jnp.where(jnp.isnan(e), jnp.inf, e), y_error)
        keep, tprev, tnext, _, cstate, cres = controller.adapt_step_size(
            t, tnext, y, y1, None, y_error, error_order, cstate
        )
        tprev = jnp.minimum(tprev, t1)
        tnext = _clip_to_end(tprev, tnext, t1, floor, keep)
        y = _select(keep, y1, y)
        sstate = _select(keep, sstate1, sstate)
        sres = diffrax.RESULTS.where(keep, sres, diffrax.RESULTS.successful)
        result = diffrax.RESULTS.where(sres == diffrax.RESULTS.successful, cres, sres)
        return tprev, tnext, y, sstate, cstate, RESULTS.promote(result)._value

    idx = jnp.arange(lanes)
    tnext, cstate, sstate = jax.vmap(start)(_gather(y0s, idx))
    out = jax.tree_util.tree_map(jnp.zeros_like, y0s)
    init = dict(
        idx=idx,
        active=jnp.ones(lanes, bool),
        t=jnp.full(lanes, t0, floor.dtype),
        tnext=tnext,
        y=_gather(y0s, idx),
        sstate=sstate,
        cstate=cstate,
        steps=jnp.zeros(lanes, jnp.int32),
        next=jnp.asarray(lanes, jnp.int32),
        iterations=jnp.zeros((), jnp.int32),
        out=out,
        out_result=jnp.zeros(size, jnp.int32),
        out_steps=jnp.zeros(size, jnp.int32),
    )

    def body(s):
        t, tnext, y, sstate, cstate, result = jax.vmap(step)(
            s["t"], s["tnext"], s["y"], s["sstate"], s["cstate"]
        )
        steps = s["steps"] + 1
        finished = t >= t1
        ok = result == successful
        result = jnp.where(ok & ~finished & (steps >= max_steps), max_steps_reached, result)
        done = s["active"] & (finished | (result != successful))
        # a finished lane writes its point out ...
        where = jnp.where(done, s["idx"], size)
        out = jax.tree_util.tree_map(lambda o, v: o.at[where].set(v, mode="drop"), s["out"], y)
        out_result = s["out_result"].at[where].set(result, mode="drop")
        out_steps = s["out_steps"].at[where].set(steps, mode="drop")
        # ... and takes the next point not yet started
        new = s["next"] + jnp.cumsum(done) - 1
        has_new = done & (new < size)
        take = jnp.minimum(new, size - 1)
        y_new = _gather(y0s, take)
        f_tnext, f_cstate, f_sstate = jax.vmap(start)(y_new)
        active = jnp.where(done, has_new, s["active"])
        return dict(
            idx=jnp.where(done, take, s["idx"]),
            active=active,
            t=jnp.where(done, jnp.asarray(t0, t.dtype), t),
            tnext=jnp.where(done, f_tnext, tnext),
            y=_select(done, y_new, y),
            sstate=_select(done, f_sstate, sstate),
            cstate=_select(done, f_cstate, cstate),
            steps=jnp.where(done, 0, steps),
            next=s["next"] + jnp.sum(done, dtype=jnp.int32),
            iterations=s["iterations"] + 1,
            out=out,
            out_result=out_result,
            out_steps=out_steps,
        )

    final = jax.lax.while_loop(lambda s: jnp.any(s["active"]), body, init)
    stats = LaneStats(steps=final["out_steps"], lane_steps=final["iterations"] * lanes)
    return final["out"], final["out_result"], stats


def _in_chunks(y0s, size, lanes):
    """`y0s` padded with copies of its last point to `chunks x lanes` points,
    shaped `(chunks, lanes, ...)`."""
    chunks = -(-size // lanes)
    pad = chunks * lanes - size

    def shape(a):
        if pad:
            a = jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)])
        return a.reshape((chunks, lanes) + a.shape[1:])

    return jax.tree_util.tree_map(shape, y0s)


def _flatten(tree, size):
    return jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[2:])[:size], tree)


def _diffeqsolve(f, y0, t0, t1, solver, controller, max_steps, forward):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: f(t, y)),
        solver,
        t0=t0,
        t1=t1,
        dt0=None,
        y0=y0,
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=controller,
        max_steps=max_steps,
        adjoint=diffrax.ForwardMode() if forward else diffrax.RecursiveCheckpointAdjoint(),
        throw=False,
    )
    y = jax.tree_util.tree_map(lambda a: a[0], sol.ys)
    return y, RESULTS.promote(sol.result)._value, sol.stats["num_steps"].astype(jnp.int32)


def chunked_solve(f, y0s, *, t0, t1, solver, controller, max_steps, lanes, forward=False):
    """As `refill_solve`, in chunks of `lanes` points, each a `vmap` of
    `diffrax.diffeqsolve` that runs until its slowest point is done."""
    size = jax.tree_util.tree_leaves(y0s)[0].shape[0]
    lanes = max(1, min(lanes, size))

    def chunk(ys):
        return jax.vmap(
            lambda y: _diffeqsolve(f, y, t0, t1, solver, controller, max_steps, forward)
        )(ys)

    ys, codes, steps = jax.lax.map(chunk, _in_chunks(y0s, size, lanes))
    lane_steps = lanes * jnp.sum(jnp.max(steps, axis=1))
    stats = LaneStats(steps=_flatten(steps, size), lane_steps=lane_steps)
    return _flatten(ys, size), _flatten(codes, size), stats


def max_point_rms(lane_axis_tree) -> Array:
    """The largest per-point RMS norm of a tree whose leaves have the points on
    their leading axis: every point's own error, so a step is accepted only when
    every point meets its tolerance (torchdiffeq's default RMS over the whole
    batch lets the easy points mask a hard one)."""
    leaves = jax.tree_util.tree_leaves(lane_axis_tree)
    squares = sum(jnp.sum(jnp.reshape(jnp.abs(a) ** 2, (a.shape[0], -1)), axis=1) for a in leaves)
    count = sum(a[0].size for a in leaves)
    return jnp.sqrt(jnp.max(squares) / count)


def joint_solve(f, y0s, *, t0, t1, solver, controller, max_steps, lanes, forward=False):
    """As `refill_solve`, in chunks of `lanes` points that share their steps:
    one `diffrax.diffeqsolve` of the stacked chunk whose error norm is
    `max_point_rms` (`controller` must carry it). A chunk fails or succeeds as a
    whole."""
    size = jax.tree_util.tree_leaves(y0s)[0].shape[0]
    lanes = max(1, min(lanes, size))

    def chunk(ys):
        y, code, steps = _diffeqsolve(
            jax.vmap(f, in_axes=(None, 0)), ys, t0, t1, solver, controller, max_steps, forward
        )
        return y, jnp.full(lanes, code), jnp.full(lanes, steps)

    ys, codes, steps = jax.lax.map(chunk, _in_chunks(y0s, size, lanes))
    stats = LaneStats(steps=_flatten(steps, size), lane_steps=lanes * jnp.sum(steps[:, 0]))
    return _flatten(ys, size), _flatten(codes, size), stats
